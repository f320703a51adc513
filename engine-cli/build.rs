//! Stamps the commit into `cinecut-infer --version`: `git rev-parse` in a checkout, else
//! `$CINECUT_COMMIT` (for builds from a packaged crate), else "unknown".

use std::process::Command;

fn main() {
    let from_git = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|commit| !commit.is_empty());
    let commit = from_git
        .or_else(|| std::env::var("CINECUT_COMMIT").ok())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=CINECUT_COMMIT={commit}");
    println!("cargo:rerun-if-env-changed=CINECUT_COMMIT");
    // A new commit moves HEAD (or the branch it names): rebuild the stamp then.
    if let Ok(head) = Command::new("git")
        .args(["rev-parse", "--git-path", "HEAD"])
        .output()
    {
        let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
        if !head.is_empty() {
            println!("cargo:rerun-if-changed={head}");
        }
    }
    if let Ok(refs) = Command::new("git")
        .args(["rev-parse", "--symbolic-full-name", "HEAD"])
        .output()
        && let Ok(path) = Command::new("git")
            .args(["rev-parse", "--git-path"])
            .arg(String::from_utf8_lossy(&refs.stdout).trim())
            .output()
    {
        let path = String::from_utf8_lossy(&path.stdout).trim().to_string();
        if !path.is_empty() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
