//! A helper process for cross-process tests. It holds something until its stdin closes:
//!
//! - `engine-holder engine GPU SERVER_BIN NVIDIA_SMI MODEL MMPROJ`: starts an engine *from a thread
//!   that then exits* (PR_SET_PDEATHSIG must not fire on that), prints `server PID`, then `ready`.
//! - `engine-holder lock GPU [try]`: takes the GPU lock, prints `locked` (or `error: ...`); with
//!   `try`, gives up after 100 ms.

use std::io::{BufRead, Write};
use std::time::Duration;

use engine_core::{Engine, EngineConfig, Wait};

fn wait_for_stdin_eof() {
    let mut line = String::new();
    while std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        line.clear();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut out = std::io::stdout();
    match args.first().map(String::as_str) {
        Some("engine") => {
            let [gpu, server, smi, model, mmproj] = &args[1..] else {
                panic!("usage: engine GPU SERVER_BIN NVIDIA_SMI MODEL MMPROJ");
            };
            let config = EngineConfig::builder(model, mmproj)
                .port(0)
                .gpu(gpu.parse::<u32>().unwrap())
                .server_bin(server)
                .nvidia_smi(smi)
                .startup_timeout(Duration::from_secs(20));
            // The spawning thread ends here, long before the engine does.
            let engine = std::thread::spawn(move || Engine::launch(config.build().unwrap()))
                .join()
                .unwrap()
                .expect("engine starts");
            writeln!(out, "server {}", engine.pid()).unwrap();
            writeln!(out, "ready").unwrap();
            out.flush().unwrap();
            wait_for_stdin_eof();
            drop(engine);
        }
        Some("lock") => {
            let gpu = args[1].parse().unwrap();
            let guard = if args.get(2).is_some_and(|a| a == "try") {
                engine_core::gpu_lock(gpu, Wait::For(Duration::from_millis(100)))
            } else {
                engine_core::gpu_lock(gpu, Wait::Forever)
            };
            match guard {
                Ok(guard) => {
                    writeln!(out, "locked").unwrap();
                    out.flush().unwrap();
                    wait_for_stdin_eof();
                    drop(guard);
                }
                Err(e) => writeln!(out, "error: {e}").unwrap(),
            }
        }
        _ => panic!("usage: engine-holder engine|lock ..."),
    }
}
