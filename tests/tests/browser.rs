//! The report in a real browser (headless Chromium): what a person would see. Needs Chromium (CI
//! installs Debian's `chromium`; `CHROMIUM` names another binary), so it is ignored by a plain
//! `cargo test`; `cargo xtask ci` runs it with `--ignored`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tests::Harness;

fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(path);
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .map(|name| Path::new("/usr/bin").join(name))
        .find(|path| path.exists())
        .expect("no Chromium: install Debian's chromium, or set CHROMIUM")
}

/// Chromium headless on `url` with `flags`; its output.
fn browse(url: &str, flags: &[&str]) -> Output {
    let profile = tempfile::tempdir().unwrap();
    Command::new(chromium())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(flags)
        .arg(url)
        .output()
        .unwrap()
}

/// The cards of a DOM dump: (whether hidden, its HTML).
fn cards(dom: &str) -> Vec<(bool, String)> {
    dom.split("<article ")
        .skip(1)
        .map(|rest| {
            let card = rest.split("</article>").next().unwrap_or("").to_string();
            let tag = card.split('>').next().unwrap_or("");
            (tag.contains("hidden"), card)
        })
        .collect()
}

#[test]
#[ignore = "needs Chromium: cargo xtask ci runs it"]
fn a_person_sees_every_card_the_failures_and_a_working_filter() {
    let h = Harness::new();
    let dir = h.frames(8);
    std::fs::write(dir.join("shot_004.40s.jpg"), b"not a jpeg").unwrap();
    let results = h.dir.path().join("scenes.jsonl");
    let summary = h.dir.path().join("summary.json");
    let out = h
        .describe_command(&[])
        .args(["--timings", "--summary"])
        .arg(&summary)
        .arg("--output")
        .arg(&results)
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = h.dir.path().join("report.html");
    let made = Command::new(tests::cinecut_infer())
        .arg("report")
        .arg(&results)
        .arg("--summary")
        .arg(&summary)
        .arg("--output")
        .arg(&html)
        .status()
        .unwrap();
    assert!(made.success());
    let url = format!("file://{}", html.display());
    let lines = tests::json_lines(&std::fs::read_to_string(&results).unwrap()).len();

    // The failed-only view (the filter, set by the link): only the failed card shows, with its
    // error; the page logs nothing to the console.
    let failed = browse(
        &format!("{url}#failed"),
        &["--enable-logging=stderr", "--v=0", "--dump-dom"],
    );
    let dom = String::from_utf8_lossy(&failed.stdout);
    let console = String::from_utf8_lossy(&failed.stderr);
    assert!(
        !console.contains("CONSOLE") && !console.contains("Uncaught"),
        "the page logged to the console: {console}"
    );
    let all = cards(&dom);
    assert_eq!(all.len(), lines, "one card per line");
    let shown: Vec<&String> = all
        .iter()
        .filter(|(hidden, _)| !hidden)
        .map(|(_, c)| c)
        .collect();
    assert_eq!(shown.len(), 1, "the filter shows only the failed card");
    assert!(shown[0].contains("class=\"card failed\"") && shown[0].contains("not a JPEG or PNG"));
    assert!(dom.contains("1 of 8 shown"), "the count of shown cards");

    // The search, for a word of the first answer: every card shown has it, the failed card does not.
    let lines_read = tests::json_lines(&std::fs::read_to_string(&results).unwrap());
    let word = lines_read
        .iter()
        .find_map(|l| l["scene"]["setting"].as_str())
        .and_then(|s| s.split_whitespace().last())
        .unwrap()
        .to_string();
    let searched = browse(&format!("{url}#q={word}"), &["--dump-dom"]);
    let all = cards(&String::from_utf8_lossy(&searched.stdout));
    let shown: Vec<&String> = all
        .iter()
        .filter(|(hidden, _)| !hidden)
        .map(|(_, c)| c)
        .collect();
    assert!(
        !shown.is_empty() && shown.len() < all.len(),
        "{} of {}",
        shown.len(),
        all.len()
    );
    assert!(shown.iter().all(|c| c.contains(&word)), "{word}");

    // A link whose search is not valid percent-encoding (`100%`) is searched as written: the
    // script runs to the end (the count is set, nothing is thrown) and no card holds "100%".
    let odd = browse(
        &format!("{url}#failed&q=100%"),
        &["--enable-logging=stderr", "--v=0", "--dump-dom"],
    );
    let console = String::from_utf8_lossy(&odd.stderr);
    assert!(!console.contains("Uncaught"), "{console}");
    let dom = String::from_utf8_lossy(&odd.stdout);
    assert!(dom.contains(&format!("0 of {lines} shown")), "{dom}");

    // Scripts off: the page as written shows every card (none hidden; the controls that need the
    // script are).
    let page = std::fs::read_to_string(&html).unwrap();
    let all = cards(&page);
    assert_eq!(all.len(), lines);
    assert!(all.iter().all(|(hidden, _)| !hidden));
    assert!(page.contains("id=\"tools\" hidden"));
    // (Headless Chromium cannot dump a page with scripts off: the static page is the check.)

    // A screenshot is not blank: the thumbnails and the text make many colours.
    let shot = h.dir.path().join("shot.png");
    let flag = format!("--screenshot={}", shot.display());
    browse(&url, &["--window-size=1200,900", &flag]);
    let image = image::open(&shot).unwrap().into_rgb8();
    let colours: std::collections::HashSet<[u8; 3]> = image.pixels().map(|p| p.0).collect();
    assert!(
        colours.len() > 500,
        "{} colours: a blank page",
        colours.len()
    );
    h.assert_clean();
}
