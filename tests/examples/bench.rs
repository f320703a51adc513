//! Process-level benchmarks against the fake server, written as a report: readiness lag (with the
//! plan's 1 s poller side by side), stop latency, model swap, pool dispatch and shard balance,
//! per-frame client overhead (with a bare ureq loop side
//! by side), slot scaling, and the VRAM probe. Server-side times come from the fake's events file.
//! Run through `cargo xtask bench`, which also adds the criterion numbers.
//!
//! Usage: bench [--out FILE] [--criterion DIR] [--gpu FILE]... [--quick]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use engine_core::config::{Count, EngineConfigBuilder};
use engine_core::gpu::NvidiaSmi;
use engine_core::launch::Gpus;
use engine_core::shard::Shard;
use engine_core::{CancellationToken, Engine, KeyframeRecord, Launch, Wait, check_vram_free_mib};
use tests::Harness;

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn ms(ns: f64) -> String {
    format!("{:.2} ms", ns / 1e6)
}

/// p-th percentile (nearest rank) of `values` (sorted here).
fn pct(values: &mut [f64], p: usize) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = (values.len() * p).div_ceil(100).max(1) - 1;
    values[rank.min(values.len() - 1)]
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// The last event `name` the fake wrote, as unix ns.
fn last_event(h: &Harness, name: &str) -> u64 {
    h.server_events()
        .iter()
        .rev()
        .find(|e| e["event"] == name)
        .and_then(|e| e["t_unix_ns"].as_u64())
        .unwrap_or_else(|| panic!("no {name} event"))
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

struct Report {
    text: String,
}

impl Report {
    fn line(&mut self, line: impl AsRef<str>) {
        self.text.push_str(line.as_ref());
        self.text.push('\n');
        eprintln!("{}", line.as_ref());
    }
}

fn config(h: &Harness) -> EngineConfigBuilder {
    h.config().vram_recovery_timeout(Duration::ZERO)
}

/// `start()` lags behind the fake's `ready` event (ns), over `runs` starts with `log` as the fake's
/// log style (`11434`, `9093`: the real servers' lines; `none`: no line, the poll alone).
fn start_lags(runs: usize, load: &str, log: &str) -> (Vec<f64>, Vec<f64>) {
    let h = Harness::new();
    let cfg = config(&h)
        .env("FAKE_LLAMA_LOAD_MS", load)
        .env("FAKE_LLAMA_LOG", log);
    let (mut lags, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let locked = Engine::new(cfg.clone().build().unwrap())
            .check_vram(Wait::Forever)
            .unwrap()
            .lock_gpu(Wait::Forever)
            .unwrap();
        let cpu_before = cpu_ns();
        let engine = locked.start(Wait::Forever).unwrap();
        let returned = unix_ns();
        cpu.push((cpu_ns() - cpu_before) as f64);
        lags.push(returned.saturating_sub(last_event(&h, "ready")) as f64);
        engine.shutdown().unwrap();
    }
    (lags, cpu)
}

/// Through the CLI: from the fake's `ready` event to the moment `--summary` says the run could
/// first answer (its `ready_at`), over `runs` runs of one frame.
fn cli_lags(runs: usize, load: &str) -> Vec<f64> {
    let h = Harness::new();
    let frame = h.jpeg("frame.jpg", 64, 48, [90, 60, 30]);
    let summary = h.dir.path().join("summary.json");
    (0..runs)
        .map(|_| {
            let out = h
                .describe_command(&[("FAKE_LLAMA_LOAD_MS", load)])
                .args(["--progress", "off", "--output", "/dev/null", "--summary"])
                .arg(&summary)
                .arg(&frame)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let s: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
            let ready_ns = (s["ready_at_unix_s"].as_f64().unwrap() * 1e9) as u64;
            ready_ns.saturating_sub(last_event(&h, "ready")) as f64
        })
        .collect()
}

fn readiness(r: &mut Report, runs: usize) {
    let load = "300";
    let (mut lags, cpu) = start_lags(runs, load, "11434");
    let (mut old_lags, _) = start_lags(runs, load, "9093");
    let (mut poll_lags, poll_cpu) = start_lags(runs, load, "none");
    let mut cli = cli_lags(runs, load);

    // CineCut's plan's design: poll /health, sleep 1 s between polls.
    let plan = Harness::new();
    let mut plan_lags = Vec::new();
    for _ in 0..runs {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(tests::fake_server())
            .args([
                "-m",
                plan.model.to_str().unwrap(),
                "--mmproj",
                plan.mmproj.to_str().unwrap(),
            ])
            .args(["--port", &port.to_string(), "--log-disable"])
            .env("FAKE_LLAMA_LOAD_MS", load)
            .env("FAKE_LLAMA_EVENTS", &plan.events)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        loop {
            if health_ok(port) {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        let returned = unix_ns();
        plan_lags.push(returned.saturating_sub(last_event(&plan, "ready")) as f64);
        let pid = rustix::process::Pid::from_child(&child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        child.wait().unwrap();
    }
    let (p50, p99) = (pct(&mut lags, 50), pct(&mut lags, 99));
    let (c50, c99) = (pct(&mut cli, 50), pct(&mut cli, 99));
    r.line("## Readiness lag");
    r.line(format!(
        "From the fake server's `ready` event to `start()` returning `Engine<Healthy>` (which includes \
         one `/health` and the authenticated `/props` check), {runs} starts each, load time {load} \
         ms, all measured in this run. The engine wakes on the line the server logs right after it \
         turns ready (`…: model loaded`; the fake writes each version's lines as the real ones \
         do); without it, the 5 ms poll finds readiness."
    ));
    r.line("");
    r.line("| how | p50 | p99 |");
    r.line("| --- | --- | --- |");
    r.line(format!(
        "| engine, waking on the log line (11434's lines) | {} | {} |",
        ms(p50),
        ms(p99)
    ));
    r.line(format!(
        "| engine, waking on the log line (9093's lines) | {} | {} |",
        ms(pct(&mut old_lags, 50)),
        ms(pct(&mut old_lags, 99))
    ));
    r.line(format!(
        "| engine, a server that logs nothing (5 ms poll) | {} | {} |",
        ms(pct(&mut poll_lags, 50)),
        ms(pct(&mut poll_lags, 99))
    ));
    r.line(format!(
        "| through the CLI: to `--summary`'s `ready_at` (11434's lines) | {} | {} |",
        ms(c50),
        ms(c99)
    ));
    r.line(format!(
        "| the plan's design (1 s sleep between polls) | {} | {} |",
        ms(pct(&mut plan_lags, 50)),
        ms(pct(&mut plan_lags, 99))
    ));
    r.line("");
    r.line(format!(
        "CPU time of this process per start (spawn, ~{load} ms of waiting, props check): {} waking \
         on the line, {} polling.",
        ms(mean(&cpu)),
        ms(mean(&poll_cpu))
    ));
    r.line(format!(
        "Goal p50 ≤ 1 ms through the CLI: {}; engine p99 ≤ 15 ms: {}.",
        verdict(c50 <= 1e6),
        verdict(p99 <= 15e6)
    ));
    r.line("");
}

/// CineCut's two stages on one GPU: the vision model, then the text model. `swap` (stop, VRAM wait,
/// start, the lock held throughout) against `shutdown` followed by a separate `launch` (VRAM check,
/// lock, start), side by side in this run.
fn model_swap(r: &mut Report, runs: usize) {
    let h = Harness::new();
    // The default 5 s recovery wait: after each stop the shim is asked until VRAM is back.
    let vision = h.config().env("FAKE_LLAMA_LOAD_MS", "0");
    let text = vision.clone().text_only();
    let mut swaps = Vec::new();
    let mut engine = Engine::launch(vision.clone().build().unwrap()).unwrap();
    for i in 0..runs {
        let next = if i % 2 == 0 { &text } else { &vision };
        let started = Instant::now();
        engine = engine
            .swap(next.clone().build().unwrap(), Wait::Forever)
            .unwrap();
        swaps.push(started.elapsed().as_nanos() as f64);
    }
    engine.shutdown().unwrap();
    let mut separate = Vec::new();
    let mut engine = Engine::launch(vision.clone().build().unwrap()).unwrap();
    for i in 0..runs {
        let next = if i % 2 == 0 { &text } else { &vision };
        let started = Instant::now();
        engine.shutdown().unwrap();
        engine = Engine::launch(next.clone().build().unwrap()).unwrap();
        separate.push(started.elapsed().as_nanos() as f64);
    }
    engine.shutdown().unwrap();
    let (w50, w99) = (pct(&mut swaps, 50), pct(&mut swaps, 99));
    let (s50, s99) = (pct(&mut separate, 50), pct(&mut separate, 99));
    r.line("## Model swap");
    r.line(format!(
        "The vision model to the text model and back, {runs} times each way of doing it (fake \
         server, load time 0, so this is the engine's own cost; a real model adds its load time to \
         both): `swap` keeps the GPU lock, `shutdown` + `launch` lets go of it in between."
    ));
    r.line("");
    r.line("| how | p50 | p99 |");
    r.line("| --- | --- | --- |");
    r.line(format!(
        "| `swap` (stop + VRAM wait + start) | {} | {} |",
        ms(w50),
        ms(w99)
    ));
    r.line(format!(
        "| `shutdown` + `launch` (stop + VRAM wait, then check + lock + start) | {} | {} |",
        ms(s50),
        ms(s99)
    ));
    r.line("");
    r.line(format!(
        "`swap` takes {:.2}× the time of a stop and a separate start at the median, and no other \
         process can take the GPU in between.",
        w50 / s50
    ));
    r.line("");
}

/// The pool's own cost: 2 engines of 2 slots against 1 engine of 4, the same frames, on servers
/// that take 20 ms a request (so both are bound by the slots, and any gap is dispatch).
fn pool_dispatch(r: &mut Report, frames_n: usize) {
    let h = Harness::new();
    let other = Harness::new();
    let base = config(&h).env("FAKE_LLAMA_LATENCY_MS", "20");
    let frames: Vec<KeyframeRecord> = (0..frames_n)
        .map(|i| {
            KeyframeRecord::new(
                h.jpeg(&format!("p{i}.jpg"), 32, 24, [9, 9, 9]),
                0.0,
                "bench",
            )
        })
        .collect();
    let time = |launch: Launch| {
        let never = CancellationToken::new();
        let pool = launch.plan(&never).unwrap().start(&never, &|_| {}).unwrap();
        let started = Instant::now();
        let done = pool.describe_many(&frames, |_, _| std::ops::ControlFlow::Continue(()));
        let took = started.elapsed().as_secs_f64();
        assert!(done.results.iter().all(Result::is_ok));
        pool.shutdown();
        took
    };
    let mut single = Vec::new();
    let mut pooled = Vec::new();
    let mut siblings = Vec::new();
    for _ in 0..3 {
        single.push(time(Launch::new(base.clone().slots(4).build().unwrap())));
        let two_gpus = Gpus::List(vec![h.gpu.into(), other.gpu.into()]);
        pooled.push(time(
            Launch::new(base.clone().slots(2).build().unwrap()).gpus(two_gpus),
        ));
        siblings.push(time(
            Launch::new(base.clone().slots(4).build().unwrap()).servers_per_gpu(Count::Fixed(2)),
        ));
    }
    let (s, p) = (pct(&mut single, 50), pct(&mut pooled, 50));
    let sib = pct(&mut siblings, 50);
    let overhead = (p / s - 1.0) * 100.0;
    r.line("## Pool dispatch");
    r.line(format!(
        "{frames_n} frames on fake servers that take 20 ms a request: one engine of 4 slots against \
         a pool of 2 engines of 2 slots (same total), median of 3 runs each, interleaved."
    ));
    r.line("");
    r.line("| engines | frames/s |");
    r.line("| --- | --- |");
    r.line(format!("| 1 × 4 slots | {:.1} |", frames_n as f64 / s));
    r.line(format!(
        "| 2 GPUs × 2 slots (a pool) | {:.1} |",
        frames_n as f64 / p
    ));
    r.line(format!(
        "| 1 GPU × 2 servers × 2 slots (`--servers-per-gpu 2`) | {:.1} |",
        frames_n as f64 / sib
    ));
    r.line("");
    r.line(format!(
        "The pool's dispatch costs {overhead:+.2} % (goal ≤ 2 %: {}).",
        verdict(overhead <= 2.0)
    ));
    r.line("");
    // Shard balance: 10,000 keyframe names.
    let names: Vec<String> = (0..10_000)
        .map(|i| format!("/film/keyframes/frame_{:010}.jpg", i * 417 % 7_200_000))
        .collect();
    r.line("## Shard balance");
    r.line(
        "10,000 keyframe names split by `--shard I/N` (sorted, dealt out in turn): the largest \
         shard is the mean rounded up, so it stays within 1 % of the mean up to 100 shards.",
    );
    r.line("");
    r.line("| shards | mean | largest | above the mean |");
    r.line("| --- | --- | --- | --- |");
    // The largest shard is the mean rounded up: within 1 % while the mean is 100 or more.
    for count in [4, 16, 64, 100] {
        let largest = (0..count)
            .map(|index| {
                engine_core::shard::positions(&names, Shard::new(index, count).unwrap()).len()
            })
            .max()
            .unwrap();
        let mean = names.len() as f64 / count as f64;
        let above = (largest as f64 / mean - 1.0) * 100.0;
        r.line(format!(
            "| {count} | {mean:.1} | {largest} | {above:.2} % (goal ≤ 1 %: {}) |",
            verdict(above <= 1.0)
        ));
    }
    r.line("");
}

fn health_ok(port: u16) -> bool {
    tests::http_request(port, "GET", "/health", None, "", Duration::from_secs(2))
        .is_some_and(|(status, body)| status == 200 && body.contains(r#""status":"ok""#))
}

fn stop_latency(r: &mut Report, runs: usize) {
    let h = Harness::new();
    let cfg = config(&h).env("FAKE_LLAMA_LOAD_MS", "0");
    let mut over = Vec::new();
    for _ in 0..runs {
        let engine = Engine::launch(cfg.clone().build().unwrap()).unwrap();
        engine.shutdown().unwrap();
        let reaped = unix_ns();
        over.push(reaped.saturating_sub(last_event(&h, "exit")) as f64);
    }
    let grace = Duration::from_millis(500);
    let stubborn = Harness::new();
    let cfg = config(&stubborn)
        .env("FAKE_LLAMA_LOAD_MS", "0")
        .env("FAKE_LLAMA_SIGTERM", "ignore")
        .stop_grace(grace);
    let mut kill = Vec::new();
    for _ in 0..runs.min(10) {
        let engine = Engine::launch(cfg.clone().build().unwrap()).unwrap();
        let started = Instant::now();
        engine.shutdown().unwrap();
        kill.push(started.elapsed().as_nanos() as f64);
    }
    let (o50, o99) = (pct(&mut over, 50), pct(&mut over, 99));
    let (k50, k99) = (pct(&mut kill, 50), pct(&mut kill, 99));
    let grace_ns = grace.as_nanos() as f64;
    r.line("## Stop latency");
    r.line(format!(
        "`shutdown()` until reaped, {runs} stops of a server that honours SIGTERM (measured from the \
         server's own `exit` event) and {} of one that ignores it (grace {} ms).",
        runs.min(10),
        grace.as_millis()
    ));
    r.line("");
    r.line("| server | p50 | p99 | goal |");
    r.line("| --- | --- | --- | --- |");
    r.line(format!(
        "| honours SIGTERM: reaped after its exit | {} | {} | ≤ 2 ms: {} |",
        ms(o50),
        ms(o99),
        verdict(o50 <= 2e6)
    ));
    r.line(format!(
        "| ignores SIGTERM: whole stop | {} | {} | grace + ≤ 10 ms: {} |",
        ms(k50),
        ms(k99),
        verdict(k99 <= grace_ns + 10e6)
    ));
    r.line("");
}

fn frame_1080p(h: &Harness) -> PathBuf {
    let path = h.dir.path().join("frame-1080p.jpg");
    image::RgbImage::from_fn(1920, 1080, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 256) as u8])
    })
    .save_with_format(&path, image::ImageFormat::Jpeg)
    .unwrap();
    path
}

fn per_frame(r: &mut Report, runs: usize) {
    let h = Harness::new();
    let frame = frame_1080p(&h);
    let engine =
        Engine::launch(config(&h).env("FAKE_LLAMA_LOAD_MS", "0").build().unwrap()).unwrap();
    let record = KeyframeRecord::new(&frame, 0.0, "bench");

    // The bare loop: the same server, the same prepared bytes, plain ureq.
    let body = engine
        .config()
        .describe_options()
        .request_body(&frame)
        .unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder().proxy(None).build().into();
    let url = format!("{}/v1/chat/completions", engine.base_url());
    let bearer = format!("Bearer {}", engine.api_key());
    let bare_call = || {
        let mut response = agent
            .post(&url)
            .header("Authorization", &bearer)
            .header("Content-Type", "application/json")
            .send(&body[..])
            .unwrap();
        let text = response.body_mut().read_to_string().unwrap();
        assert!(text.contains("visual_content"));
    };

    for _ in 0..5 {
        engine.describe(&record).unwrap();
        bare_call();
    }
    // Interleave the two in rounds so that machine noise hits both alike.
    let (mut with_engine, mut with_bare) = (Vec::new(), Vec::new());
    for _ in 0..(runs / 10).max(1) {
        for _ in 0..10 {
            let t = Instant::now();
            engine.describe(&record).unwrap();
            with_engine.push(t.elapsed().as_nanos() as f64);
        }
        for _ in 0..10 {
            let t = Instant::now();
            bare_call();
            with_bare.push(t.elapsed().as_nanos() as f64);
        }
    }
    drop(engine);

    let (e, b) = (mean(&with_engine), mean(&with_bare));
    let (e50, b50) = (pct(&mut with_engine, 50), pct(&mut with_bare, 50));
    let overhead = e50 - b50;
    let ratio = b / e;
    r.line("## Per-frame client overhead");
    r.line(format!(
        "`describe()` of a 1920×1080 JPEG ({} KiB) against a zero-latency fake (which decodes the JPEG \
         fully, as the real server does), against a bare ureq loop posting the same prepared bytes to \
         the same server; {} calls each, interleaved in rounds of 10.",
        std::fs::metadata(&frame).unwrap().len() / 1024,
        with_engine.len()
    ));
    r.line("");
    r.line("| client | mean | p50 |");
    r.line("| --- | --- | --- |");
    r.line(format!(
        "| engine `describe()` (read + encode + request + parse + validate) | {} | {} |",
        ms(e),
        ms(e50)
    ));
    r.line(format!(
        "| bare ureq loop (request only) | {} | {} |",
        ms(b),
        ms(b50)
    ));
    r.line("");
    r.line(format!(
        "Engine overhead per frame (p50 difference): {}; goal ≤ 1 ms: {}. Throughput ratio bare/engine \
         (means): {ratio:.3}; goal ≥ 0.9: {}.",
        ms(overhead),
        verdict(overhead <= 1e6),
        verdict(ratio >= 0.9)
    ));
    r.line("");
}

fn slot_scaling(r: &mut Report) {
    let h = Harness::new();
    let frames: Vec<KeyframeRecord> = (0..32)
        .map(|i| {
            KeyframeRecord::new(
                h.jpeg(&format!("s{i}.jpg"), 64, 48, [i as u8 * 7, 90, 30]),
                0.0,
                "bench",
            )
        })
        .collect();
    let latency = 100;
    r.line("## Slot scaling");
    r.line(format!(
        "`describe_many` of {} frames with concurrency = slots, against a fake that takes {latency} ms \
         per request and serves `slots` requests at once.",
        frames.len()
    ));
    r.line("");
    r.line("| slots | elapsed | frames/s | relative to 1 slot |");
    r.line("| --- | --- | --- | --- |");
    let mut base = 0.0;
    for slots in [1u32, 2, 4, 8] {
        let engine = Engine::launch(
            config(&h)
                .slots(slots)
                .env("FAKE_LLAMA_LOAD_MS", "0")
                .env("FAKE_LLAMA_LATENCY_MS", latency.to_string())
                .build()
                .unwrap(),
        )
        .unwrap();
        let t = Instant::now();
        let results = engine
            .describe_many(&frames, slots as usize, |_, _| {
                std::ops::ControlFlow::Continue(())
            })
            .results;
        let elapsed = t.elapsed();
        assert!(results.iter().all(Result::is_ok));
        engine.shutdown().unwrap();
        let rate = frames.len() as f64 / elapsed.as_secs_f64();
        if slots == 1 {
            base = rate;
        }
        r.line(format!(
            "| {slots} | {:.0} ms | {rate:.1} | {:.2}× |",
            elapsed.as_secs_f64() * 1000.0,
            rate / base
        ));
    }
    r.line("");
}

fn vram_probe(r: &mut Report, runs: usize) {
    let probe = NvidiaSmi::new(tests::nvsmi_shim(), NvidiaSmi::DEFAULT_TIMEOUT).into();
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        // The bare shim reports one GPU.
        check_vram_free_mib(&probe, 0).unwrap();
        times.push(t.elapsed().as_nanos() as f64);
    }
    r.line("## VRAM probe");
    r.line(format!(
        "One `check_vram_free_mib` through the nvidia-smi shim (a process start, as with the real \
         nvidia-smi), {runs} runs: p50 {}, p99 {}.",
        ms(pct(&mut times, 50)),
        ms(pct(&mut times, 99))
    ));
    r.line("");
}

/// Criterion's median estimate for `name`, in ns.
fn criterion_median(dir: &Path, name: &str) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join(name).join("new").join("estimates.json")).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value["median"]["point_estimate"].as_f64()
}

fn in_process(r: &mut Report, dir: &Path) {
    let rows = [
        (
            "request_body_1080p_jpeg",
            "read + check + base64 + JSON body of a 1920×1080 JPEG",
        ),
        (
            "parse_and_validate_answer",
            "parse a chat answer, strip the fence, validate the schema",
        ),
        (
            "parse_nvidia_smi_8_gpus",
            "parse nvidia-smi output for 8 GPUs",
        ),
    ];
    if rows
        .iter()
        .all(|(name, _)| criterion_median(dir, name).is_none())
    {
        return;
    }
    r.line("## In-process parts (criterion)");
    r.line("");
    r.line("| part | median |");
    r.line("| --- | --- |");
    for (name, what) in rows {
        if let Some(ns) = criterion_median(dir, name) {
            r.line(format!("| {what} (`{name}`) | {:.1} µs |", ns / 1000.0));
        }
    }
    r.line("");
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
    };
    let out = value("--out").unwrap_or_else(|| PathBuf::from("BENCHMARKS.md"));
    let criterion = value("--criterion").unwrap_or_else(|| PathBuf::from("target/criterion"));
    let quick = args.iter().any(|a| a == "--quick");
    let runs = if quick { 10 } else { 50 };

    let mut r = Report {
        text: String::new(),
    };
    r.line("# Benchmarks");
    r.line("");
    r.line(format!(
        "Machine: {}. Date: {}. Written by `cargo xtask bench`{}.",
        machine(),
        today(),
        if quick {
            " (quick mode: fewer runs)"
        } else {
            ""
        }
    ));
    r.line("");
    r.line(
        "Method: release builds; the fake llama-server stands in for the real one and writes \
         server-side timestamps to its events file; each comparison runs side by side in the same \
         run, since these machines are noisy. Percentiles are nearest-rank.",
    );
    r.line("");
    readiness(&mut r, runs);
    stop_latency(&mut r, runs);
    model_swap(&mut r, runs);
    per_frame(&mut r, if quick { 50 } else { 200 });
    slot_scaling(&mut r);
    pool_dispatch(&mut r, if quick { 100 } else { 400 });
    vram_probe(&mut r, runs);
    in_process(&mut r, &criterion);
    let gpu_sections = args
        .windows(2)
        .filter(|w| w[0] == "--gpu")
        .filter_map(|w| std::fs::read_to_string(&w[1]).ok());
    for section in gpu_sections {
        r.line(section.trim_end());
        r.line("");
    }
    std::fs::write(&out, &r.text).unwrap();
    eprintln!("wrote {}", out.display());
}
