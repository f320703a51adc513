//! What the engine guarantees beyond Ollama's and llama-swap's supervision: no orphan when we die,
//! a cross-process per-GPU lock, a server proven to be ours, VRAM recovery before the lock goes.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use engine_core::gpu::VramRecovery;
use engine_core::{Engine, StartError, Wait};
use tests::{Harness, SHIM_GPUS, running};

/// A running `engine-holder` with its stdout lines.
struct Holder {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
}

impl Holder {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Holder {
        Holder::spawn_without(args, env, &[])
    }

    /// As `spawn`, with the variables in `unset` removed from the holder's environment.
    fn spawn_without(args: &[&str], env: &[(&str, &str)], unset: &[&str]) -> Holder {
        let mut command = Command::new(env!("CARGO_BIN_EXE_engine-holder"));
        for name in unset {
            command.env_remove(name);
        }
        let mut child = command
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Holder { child, lines }
    }

    fn line(&mut self) -> String {
        self.lines.next().expect("a line").unwrap()
    }

    /// Closes stdin (the holder then releases what it holds) and waits for the exit.
    fn release(mut self) {
        drop(self.child.stdin.take());
        self.child.wait().unwrap();
    }
}

#[test]
fn the_server_dies_with_a_sigkilled_owner_even_when_started_from_a_finished_thread() {
    let h = Harness::new();
    let shim = h.shim(&[("NVSMI_GPU_COUNT", &SHIM_GPUS.to_string())]);
    let gpu = h.gpu.to_string();
    let mut holder = Holder::spawn(
        &[
            "engine",
            &gpu,
            tests::fake_server().to_str().unwrap(),
            shim.to_str().unwrap(),
            h.model.to_str().unwrap(),
            h.mmproj.to_str().unwrap(),
        ],
        &[],
    );
    let server: u32 = holder
        .line()
        .strip_prefix("server ")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(holder.line(), "ready");
    // The thread that spawned the server has exited; the server must still be up.
    assert!(running(server));
    holder.child.kill().unwrap();
    holder.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    while running(server) {
        assert!(
            Instant::now() < deadline,
            "server {server} outlived its owner by 1 s"
        );
        std::thread::yield_now();
    }
    // The kernel drops the dead holder's file lock once the keeper, which holds it too, is gone.
    tests::wait_lock_free(h.gpu);
}

/// Starts an `engine-holder` on a server behind a wrapper script (optionally through `launcher`,
/// a program that execs the holder), SIGKILLs it once ready, and checks that the server's tree is
/// gone before the GPU lock is free: the keeper holds the lock until it has ended the tree.
fn sigkill_owner_of_wrapped_server(launcher: &[&str]) {
    let h = Harness::new();
    let shim = h.shim(&[]);
    let gpu = h.gpu.to_string();
    let wrapper = h.wrapper_without_exec();
    let holder_args = [
        "engine",
        &gpu,
        wrapper.to_str().unwrap(),
        shim.to_str().unwrap(),
        h.model.to_str().unwrap(),
        h.mmproj.to_str().unwrap(),
    ];
    let mut command = match launcher.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(env!("CARGO_BIN_EXE_engine-holder"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_engine-holder")),
    };
    let mut child = command
        .args(holder_args)
        .env("FAKE_LLAMA_EVENTS", &h.events)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let shell: u32 = first.strip_prefix("server ").unwrap().parse().unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let server = h.spawned_pids()[0];
    assert_ne!(shell, server, "the server is the wrapper's child");
    child.kill().unwrap();
    child.wait().unwrap();
    // Before: PR_SET_PDEATHSIG took the shell; the server lived on with ppid 1, /health answering.
    tests::wait_lock_free(h.gpu);
    assert!(
        !running(server),
        "the lock was free while the server still ran"
    );
    assert!(!running(shell));
}

#[test]
fn a_sigkilled_owner_takes_a_server_behind_a_wrapper_script_with_it() {
    sigkill_owner_of_wrapped_server(&[]);
}

#[test]
fn the_keeper_works_whatever_signal_mask_the_owner_inherited() {
    // A launcher that blocks SIGUSR2 (the keeper's parent-death signal) before it execs the owner:
    // the keeper inherited the mask and never woke.
    let block_and_exec = "import os, signal, sys\n\
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])\n\
        os.execv(sys.argv[1], sys.argv[1:])";
    sigkill_owner_of_wrapped_server(&["python3", "-c", block_and_exec]);
}

#[test]
fn two_processes_serialise_on_one_gpu_but_not_on_two() {
    let h = Harness::new();
    let gpu = h.gpu.to_string();
    let mut first = Holder::spawn(&["lock", &gpu], &[]);
    assert_eq!(first.line(), "locked");
    // Another process (this one) cannot take that GPU...
    let err = engine_core::gpu_lock(h.gpu, Wait::For(Duration::from_millis(100))).unwrap_err();
    assert!(err.to_string().contains("still locked"), "{err}");
    assert_eq!(
        engine_core::gpu::lockfile::lock_holder(h.gpu),
        Some(first.child.id())
    );
    // ...but another GPU is free.
    let other = Harness::new();
    drop(engine_core::gpu_lock(other.gpu, Wait::For(Duration::ZERO)).unwrap());
    // A second process on the same GPU waits until the first lets go.
    let mut second = Holder::spawn(&["lock", &gpu], &[]);
    first.release();
    assert_eq!(second.line(), "locked");
    second.release();
    tests::assert_lock_free(h.gpu);
}

/// What a holder process says when it takes the lock for GPU 0 in `dir` (`locked`, or the error).
fn lock_line(dir: &std::path::Path) -> String {
    let mut holder = Holder::spawn(
        &["lock", "0"],
        &[("CINECUT_LOCK_DIR", dir.to_str().unwrap())],
    );
    let line = holder.line();
    holder.release();
    line
}

#[test]
fn the_lock_folder_must_not_be_a_symlink() {
    let h = Harness::new();
    let real = h.dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = h.dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let line = lock_line(&link);
    assert!(
        line.starts_with("error: refusing the GPU lock folder"),
        "{line}"
    );
    assert!(line.contains("it is a symlink"), "{line}");
    // A fresh folder of the user's choosing is created private (0700); lock files are 0644 so that
    // anyone allowed into the folder can flock them.
    let fresh = h.dir.path().join("fresh");
    assert_eq!(lock_line(&fresh), "locked");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        (mode(&fresh), mode(&fresh.join("cinecut-gpu-0.lock"))),
        (0o700, 0o644)
    );
}

#[test]
fn unsafe_shared_or_foreign_lock_folders_are_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::new();
    let shared = h.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let line = lock_line(&shared);
    assert!(
        line.contains("others can write to it but it is not sticky"),
        "{line}"
    );
    assert!(line.contains("chmod +t"), "{line}");
    // Sticky, it is a fine place to meet.
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    assert_eq!(lock_line(&shared), "locked");
    // Not a regular file where the lock file goes (a FIFO would hang open(2)), or a hard link.
    let fifo_dir = h.dir.path().join("fifo");
    std::fs::create_dir(&fifo_dir).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        fifo_dir.join("cinecut-gpu-0.lock"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let line = lock_line(&fifo_dir);
    assert!(line.contains("not a regular file"), "{line}");
    let linked = h.dir.path().join("linked");
    std::fs::create_dir(&linked).unwrap();
    std::fs::write(h.dir.path().join("precious"), "keep").unwrap();
    std::fs::hard_link(
        h.dir.path().join("precious"),
        linked.join("cinecut-gpu-0.lock"),
    )
    .unwrap();
    let line = lock_line(&linked);
    assert!(line.contains("2 hard links"), "{line}");
    assert_eq!(
        std::fs::read_to_string(h.dir.path().join("precious")).unwrap(),
        "keep"
    );
}

/// Lock folders of another user are refused with that user named: one private to them, and one
/// shared (sticky) but owned by them, whose owner could remove our lock files.
#[test]
#[ignore = "needs root to make folders of another user: cargo xtask ci runs it as root"]
fn as_root_lock_folders_of_another_user_are_refused_by_name() {
    assert!(
        rustix::process::geteuid().is_root(),
        "run as root: it makes folders owned by another user"
    );
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::new();
    let foreign = h.dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::os::unix::fs::chown(&foreign, Some(4242), None).unwrap();
    let line = lock_line(&foreign);
    assert!(line.contains("private to uid 4242"), "{line}");
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let line = lock_line(&foreign);
    assert!(line.contains("shared but owned by uid 4242"), "{line}");
}

/// A holder running as another user (`nobody`) meets ours on the same lock file in a shared folder.
#[test]
#[ignore = "needs root (to run a holder as nobody) and setpriv: cargo xtask ci runs it as root"]
fn as_root_another_user_meets_on_the_same_lock_file() {
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    assert!(
        rustix::process::geteuid().is_root() && setpriv.exists(),
        "run as root, with /usr/bin/setpriv (util-linux): it runs a holder as nobody"
    );
    let h = Harness::new();
    // A shared folder as /run/lock is: root's, sticky, writable by all (and reachable by nobody).
    let shared = tempfile::Builder::new()
        .prefix("cinecut-shared-")
        .tempdir_in("/tmp")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let dir = ("CINECUT_LOCK_DIR", shared.path().to_str().unwrap());
    let mut ours = Holder::spawn(&["lock", "0"], &[dir]);
    assert_eq!(ours.line(), "locked");
    // What a holder running as `nobody` says when it tries the same lock for 100 ms.
    let as_nobody = || {
        let out = Command::new(setpriv)
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_engine-holder"))
            .args(["lock", "0", "try"])
            .env(dir.0, dir.1)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let said = as_nobody();
    assert!(said.contains("is still locked"), "{said}");
    ours.release();
    // Once free, the other user takes it through the file root created (read-only is enough).
    assert_eq!(as_nobody(), "locked");
    drop(h);
}

#[test]
fn by_default_every_process_meets_on_one_machine_wide_lock() {
    // The case: one run with XDG_RUNTIME_DIR set, one without, no CINECUT_LOCK_DIR. Before,
    // each took a lock of its own and both started servers on the GPU.
    let gpu = (1_000_000 + std::process::id()).to_string();
    let runtime = tempfile::tempdir().unwrap();
    let unset = ["CINECUT_LOCK_DIR", "XDG_RUNTIME_DIR", "TMPDIR"];
    let mut first = Holder::spawn_without(
        &["lock", &gpu],
        &[("XDG_RUNTIME_DIR", runtime.path().to_str().unwrap())],
        &unset,
    );
    assert_eq!(first.line(), "locked");
    let mut second = Holder::spawn_without(&["lock", &gpu, "try"], &[], &unset);
    assert!(second.line().contains("is still locked"));
    second.release();
    first.release();
    let dir = ["/run/lock", "/var/lock", "/tmp"]
        .iter()
        .map(std::path::Path::new)
        .find(|p| p.is_dir())
        .unwrap();
    let file = dir.join(format!("cinecut-gpu-{gpu}.lock"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "{} can be opened by everyone", file.display());
    let _ = std::fs::remove_file(file);
}

#[test]
fn a_healthy_answer_for_another_model_is_not_our_server() {
    let h = Harness::new();
    let err = Engine::launch(
        h.config()
            .env("FAKE_LLAMA_PROPS_MODEL", "/models/someone-elses.gguf")
            .build()
            .unwrap(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("is taken"), "{text}");
    assert!(text.contains("someone-elses.gguf"), "{text}");
    h.assert_clean();
}

#[test]
fn a_server_that_refuses_our_key_is_not_our_server() {
    let h = Harness::new();
    let err = Engine::launch(
        h.config()
            .env("FAKE_LLAMA_FOREIGN_KEY", "1")
            .build()
            .unwrap(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, engine_core::EngineError::Start(StartError::PortInUse { detail, .. }) if detail.contains("API key")),
        "{err}"
    );
    h.assert_clean();
}

#[test]
fn a_stale_server_on_the_port_is_reported_and_left_alone() {
    let h = Harness::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut stale = Command::new(tests::fake_server())
        .args([
            "-m",
            h.model.to_str().unwrap(),
            "--port",
            &port.to_string(),
            "--log-disable",
        ])
        .spawn()
        .unwrap();
    // Wait until the stale server listens (its own readiness, not a guess).
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline);
        std::thread::yield_now();
    }
    let err = Engine::launch(h.config().port(port).build().unwrap()).unwrap_err();
    assert!(
        err.to_string().contains(&format!("port {port} is taken")),
        "{err}"
    );
    assert!(h.spawned_pids().is_empty(), "nothing of ours was spawned");
    assert!(
        stale.try_wait().unwrap().is_none(),
        "the stranger is not ours to kill"
    );
    stale.kill().unwrap();
    stale.wait().unwrap();
    h.assert_clean();
}

#[test]
fn shutdown_waits_for_vram_to_come_back_and_reports_when_it_does_not() {
    let h = Harness::new();
    let free_file = h.dir.path().join("free-mib");
    let gpus = |free: &str| vec![free; SHIM_GPUS as usize].join(",");
    std::fs::write(&free_file, gpus("79000")).unwrap();
    let shim = h.shim(&[("NVSMI_FREE_FILE", free_file.to_str().unwrap())]);
    let config = h
        .config()
        .nvidia_smi(&shim)
        .vram_recovery_timeout(Duration::from_millis(300));

    // Memory back at once: recovered.
    let report = Engine::launch(config.clone().build().unwrap())
        .unwrap()
        .shutdown()
        .unwrap();
    assert!(
        matches!(
            report.vram,
            VramRecovery::Recovered {
                free_mib: 79000,
                ..
            }
        ),
        "{:?}",
        report.vram
    );

    // Memory still taken after the stop (another process grabbed it, or the driver is slow): the
    // report says so after the bounded wait, and the lock is released all the same.
    let engine = Engine::launch(config.build().unwrap()).unwrap();
    std::fs::write(&free_file, gpus("60000")).unwrap();
    let started = Instant::now();
    let report = engine.shutdown().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        report.vram,
        VramRecovery::NotRecovered {
            before_mib: 79000,
            free_mib: 60000
        }
    );
    h.assert_clean();
}

#[test]
fn a_port_of_zero_gives_each_engine_its_own_port() {
    let a = Harness::new();
    let b = Harness::new();
    let first = Engine::launch(a.config().build().unwrap()).unwrap();
    let second = Engine::launch(b.config().build().unwrap()).unwrap();
    assert_ne!(first.port(), second.port());
    drop((first, second));
    a.assert_clean();
    b.assert_clean();
}
