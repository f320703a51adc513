//! The contract between the engine and llama-server, run against whichever server it is pointed at:
//! the fake by default, or a real one with `CONTRACT_SERVER=/path/llama-server` plus
//! `CONTRACT_MODEL` and `CONTRACT_MMPROJ` (the tiny model from `cargo xtask tiny-model`).
//! `cargo xtask ci` runs it both ways. Every behaviour asserted here is one the engine relies on;
//! where the real server and the fake disagree, the fake is wrong.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use engine_core::Wait;
use engine_core::config::EngineConfigBuilder;
use engine_core::error::ModelRole;
use engine_core::process::{ChildExit, Escalation};
use engine_core::{Engine, KeyframeRecord, RequestError, StartError};
use serde_json::{Value, json};
use tests::Harness;

/// The server under test and its model pair.
struct Target {
    server: PathBuf,
    model: PathBuf,
    mmproj: PathBuf,
    real: bool,
}

fn target(h: &Harness) -> Target {
    match std::env::var_os("CONTRACT_SERVER") {
        Some(server) => Target {
            server: PathBuf::from(server),
            model: PathBuf::from(std::env::var_os("CONTRACT_MODEL").expect("CONTRACT_MODEL")),
            mmproj: PathBuf::from(std::env::var_os("CONTRACT_MMPROJ").expect("CONTRACT_MMPROJ")),
            real: true,
        },
        None => Target {
            server: tests::fake_server().to_path_buf(),
            model: h.model.clone(),
            mmproj: h.mmproj.clone(),
            real: false,
        },
    }
}

fn engine_config(h: &Harness, t: &Target) -> EngineConfigBuilder {
    let mut config = h
        .config()
        .server_bin(&t.server)
        .startup_timeout(Duration::from_secs(60));
    config = config.model(&t.model);
    config = config.mmproj(&t.mmproj);
    config
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const KEY: &str = "contract-key";

/// A server run by hand: killed and reaped when dropped, so a failing assertion (a panic) leaves no
/// server behind.
struct Spawned(Child);

impl std::ops::Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The server run by hand (not by the engine), with our key, on `port`.
fn spawn(t: &Target, port: u16, extra: &[&str]) -> Spawned {
    let mmproj = ["--mmproj".as_ref(), t.mmproj.as_os_str()];
    spawn_with(t, port, &mmproj, extra, &[])
}

/// A healthy server run by hand with the projector and no extra arguments, on a free port.
fn serving(t: &Target) -> (u16, Spawned) {
    let port = free_port();
    let mut child = spawn(t, port, &[]);
    wait_healthy(port, &mut child);
    (port, child)
}

/// As [`spawn`], text-only: the model without its projector.
fn spawn_text(t: &Target, port: u16) -> Spawned {
    spawn_with(t, port, &[], &[], &[])
}

fn spawn_with(
    t: &Target,
    port: u16,
    mmproj: &[&std::ffi::OsStr],
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Spawned {
    let mut cmd = Command::new(&t.server);
    cmd.arg("-m")
        .arg(&t.model)
        .args(mmproj)
        .args([
            "--port",
            &port.to_string(),
            "--host",
            "127.0.0.1",
            "-c",
            "2048",
            "-np",
            "1",
        ])
        .args(extra)
        .env("LLAMA_API_KEY", KEY)
        .env("FAKE_LLAMA_LOAD_MS", "300")
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Spawned(cmd.spawn().unwrap())
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// How a server run by hand ended under [`stop`].
#[derive(Debug)]
enum Stopped {
    /// The first SIGTERM ended it.
    ByFirstTerm(ExitStatus),
    /// It outlived the first SIGTERM by 10 s; the second ended it.
    BySecondTerm(ExitStatus),
    /// It outlived both and was SIGKILLed.
    Killed,
}

/// Stops a server in the engine's steps: SIGTERM, a second SIGTERM, SIGKILL. The engine's default
/// sends the second after 5 s; this waits 10, so a loaded machine's slow exit is not mistaken for a
/// lost signal.
fn stop(mut child: Spawned) -> Stopped {
    let pid = rustix::process::Pid::from_child(&child);
    let term = || rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let _ = term();
    if let Some(status) = wait_exit(&mut child, Duration::from_secs(10)) {
        return Stopped::ByFirstTerm(status);
    }
    let _ = term();
    if let Some(status) = wait_exit(&mut child, Duration::from_secs(10)) {
        return Stopped::BySecondTerm(status);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    Stopped::Killed
}

/// A server whose task loop has run (it answered a completion or `GET /slots`) stops on one
/// SIGTERM with exit code 0; never anything else, and never a hang.
fn assert_stopped_by_sigterm(stopped: Stopped) {
    assert!(
        matches!(&stopped, Stopped::ByFirstTerm(status) if status.code() == Some(0)),
        "a SIGTERM should end a serving server with exit code 0, not {stopped:?}"
    );
}

/// A server that has only just turned healthy stops on SIGTERM too, but not always on the first.
/// The real server installs its handler after `/health` turns ok, so an early SIGTERM kills it
/// outright (status 143). The handler ends the task loop by clearing its `running` flag, and the
/// loop sets that flag when it starts; so a SIGTERM between the two is swallowed (seen once in
/// CI on 11434.0.0). The handler is then spent: a second SIGTERM exits at once with code 1. The
/// engine's stop sends that second SIGTERM. The fake has its handler before it turns ready, so it
/// must exit 0 on the first.
fn assert_stopped_soon_after_ready(t: &Target, stopped: Stopped) {
    use std::os::unix::process::ExitStatusExt;
    let ok = match &stopped {
        Stopped::ByFirstTerm(status) if !t.real => status.code() == Some(0),
        Stopped::ByFirstTerm(status) => status.code() == Some(0) || status.signal() == Some(15),
        Stopped::BySecondTerm(status) => t.real && status.code() == Some(1),
        Stopped::Killed => false,
    };
    assert!(
        ok,
        "SIGTERM should end a just-ready server with 0 (or, the real one, by the signal, or a second SIGTERM with 1); got {stopped:?}"
    );
}

/// Proves the server's task loop runs: a one-token completion goes through it.
fn complete_one_token(port: u16) {
    let body = json!({"prompt": "Hello", "n_predict": 1, "temperature": 0.0});
    let (status, answer) = request(port, "POST", "/completion", Some(KEY), Some(&body)).unwrap();
    assert_eq!(status, 200, "{answer}");
}

/// One HTTP/1.1 request; (status, parsed JSON body or Null).
fn request(
    port: u16,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> Option<(u16, Value)> {
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let (status, text) =
        tests::http_request(port, method, path, key, &payload, Duration::from_secs(30))?;
    Some((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

/// Polls /health until 200; returns every non-200 answer seen on the way.
fn wait_healthy(port: u16, child: &mut Child) -> Vec<(u16, Value)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut loading = Vec::new();
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the server exited during startup"
        );
        if let Some((status, body)) = request(port, "GET", "/health", None, None) {
            if status == 200 {
                assert_eq!(body, json!({"status": "ok"}));
                return loading;
            }
            loading.push((status, body));
        }
        assert!(Instant::now() < deadline, "never healthy");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn jpeg(h: &Harness, name: &str, rgb: [u8; 3]) -> PathBuf {
    h.jpeg(name, 96, 64, rgb)
}

fn image_part(path: &PathBuf) -> Value {
    use base64::Engine as _;
    let bytes = std::fs::read(path).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    json!({"type": "image_url", "image_url": {"url": format!("data:image/jpeg;base64,{b64}")}})
}

#[test]
fn health_is_503_loading_then_200_ok_and_every_path_answers_503_while_loading() {
    let h = Harness::new();
    let t = target(&h);
    let port = free_port();
    let mut child = spawn(&t, port, &[]);
    let loading = wait_healthy(port, &mut child);
    let expected =
        json!({"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}});
    for (status, body) in &loading {
        assert_eq!((*status, body), (503, &expected));
    }
    if !t.real {
        // The fake loads for 300 ms here, so the loading answer is certainly seen.
        assert!(!loading.is_empty());
    }
    assert_stopped_soon_after_ready(&t, stop(child));
}

#[test]
fn the_log_says_model_loaded_once_ready_and_before_it_listens() {
    // The engine wakes on this line (engine-core's READY_LINE) and confirms with one /health.
    use std::io::BufRead;
    let h = Harness::new();
    let t = target(&h);
    let port = free_port();
    let mut child = spawn(&t, port, &[]);
    // Kept open until the server has stopped: its stop lines would meet a closed pipe.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut health_at_the_line = None;
    let mut order = Vec::new();
    for line in (&mut stderr).lines() {
        let line = line.unwrap();
        // engine-core's READY_LINE: 11434 writes `srv  llama_server: model loaded`, 9093 `main:
        // model loaded`.
        if line.trim_end().ends_with(": model loaded") {
            health_at_the_line = request(port, "GET", "/health", None, None).map(|(s, _)| s);
            order.push("loaded");
        }
        if line.contains("listening on") {
            order.push("listening");
            break;
        }
    }
    assert_eq!(order, ["loaded", "listening"], "the server's log changed");
    assert_eq!(
        health_at_the_line,
        Some(200),
        "the line came before the server was ready"
    );
    assert_stopped_soon_after_ready(&t, stop(child));
    drop(stderr);
}

#[test]
fn props_models_and_the_api_key_rules() {
    let h = Harness::new();
    let t = target(&h);
    let (port, child) = serving(&t);
    let given = t.model.to_str().unwrap();

    let (status, props) = request(port, "GET", "/props", Some(KEY), None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        props["model_path"], given,
        "model_path is the -m string as given"
    );
    assert_eq!(props["default_generation_settings"]["n_ctx"], 2048);
    assert_eq!(props["total_slots"], 1);
    assert_eq!(props["modalities"]["vision"], true);
    assert!(
        props["media_marker"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );

    let (status, models) = request(port, "GET", "/v1/models", Some(KEY), None).unwrap();
    assert_eq!(status, 200);
    // 11434.0.0 names the model by the -m string; 9093.0.0 by its file name. The engine reads
    // /props, never this.
    let file_name = t.model.file_name().unwrap().to_str().unwrap();
    let id = &models["data"][0]["id"];
    assert!(id == given || id == file_name, "{models}");

    // The engine's proof of ownership: /props refuses a request without our key, on every version.
    let unauthorised = json!({"error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}});
    for key in [None, Some("wrong")] {
        assert_eq!(
            request(port, "GET", "/props", key, None).unwrap(),
            (401, unauthorised.clone())
        );
        // 11434.0.0 guards /v1/models too; 9093.0.0 serves it to anyone (the same list).
        let (status, body) = request(port, "GET", "/v1/models", key, None).unwrap();
        match status {
            401 => assert_eq!(body, unauthorised),
            200 => assert_eq!(body["data"][0]["id"], *id),
            other => panic!("/v1/models answered {other}: {body}"),
        }
    }
    // /health is public.
    assert_eq!(request(port, "GET", "/health", None, None).unwrap().0, 200);
    // /props, /v1/models and /health are answered by the HTTP threads: the task loop may not have
    // started yet.
    assert_stopped_soon_after_ready(&t, stop(child));
}

#[test]
fn chat_completion_has_the_shape_the_engine_parses() {
    let h = Harness::new();
    let t = target(&h);
    let (port, child) = serving(&t);
    let frame = jpeg(&h, "a.jpg", [200, 10, 10]);
    let body = json!({
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Describe."}, image_part(&frame)]}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "scene", "schema": *engine_core::SCENE_DESCRIPTION_SCHEMA}},
        "max_tokens": 256,
        "temperature": 0.1,
    });
    let (status, answer) =
        request(port, "POST", "/v1/chat/completions", Some(KEY), Some(&body)).unwrap();
    assert_eq!(status, 200, "{answer}");
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .expect("content is a string");
    assert!(answer["choices"][0]["finish_reason"].is_string());
    assert!(answer["usage"].is_object());
    assert!(answer["timings"].is_object());
    let parsed = engine_core::request::parse_chat_response(&answer.to_string());
    assert!(parsed.is_ok(), "{content:?}: {parsed:?}");

    // An image that does not decode.
    let bad = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQSkZJRgABAQ=="}}]}],
        "response_format": body["response_format"]});
    let (status, error) =
        request(port, "POST", "/v1/chat/completions", Some(KEY), Some(&bad)).unwrap();
    assert_eq!(status, 400, "{error}");
    assert_eq!(
        error["error"]["message"],
        "Failed to load image or audio file"
    );
    assert_stopped_by_sigterm(stop(child));
}

#[test]
fn failed_starts_exit_1_fast() {
    let h = Harness::new();
    let t = target(&h);
    let missing = h.dir.path().join("missing.gguf");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cases: Vec<(&str, Vec<String>, u16)> = vec![
        ("port taken", vec![], port),
        ("unknown flag", vec!["--no-such-flag".into()], free_port()),
    ];
    for (what, extra, port) in cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut child = spawn(&t, port, &extra);
        let status = wait_exit(&mut child, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("{what}: still running"));
        assert_eq!(status.code(), Some(1), "{what}");
    }
    for missing_what in ["model", "mmproj"] {
        let mut bad = Target {
            server: t.server.clone(),
            model: t.model.clone(),
            mmproj: t.mmproj.clone(),
            real: t.real,
        };
        if missing_what == "model" {
            bad.model = missing.clone();
        } else {
            bad.mmproj = missing.clone();
        }
        let mut child = spawn(&bad, free_port(), &[]);
        let status = wait_exit(&mut child, Duration::from_secs(30)).expect("exits");
        assert_eq!(status.code(), Some(1), "missing {missing_what}");
    }
    drop(taken);
}

#[test]
fn sigterm_on_an_idle_server_exits_0() {
    let h = Harness::new();
    let t = target(&h);
    let (port, child) = serving(&t);
    complete_one_token(port);
    assert_stopped_by_sigterm(stop(child));
}

/// What the engine's readiness waits for: `GET /slots` is answered by the task loop itself (and is
/// on by default in both versions), so a SIGTERM after its answer is never the lost one.
#[test]
fn a_sigterm_after_slots_answered_exits_0() {
    let h = Harness::new();
    let t = target(&h);
    let (port, child) = serving(&t);
    let (status, slots) = request(port, "GET", "/slots", Some(KEY), None).unwrap();
    assert_eq!(status, 200, "{slots}");
    assert_eq!(slots.as_array().map(Vec::len), Some(1), "{slots}");
    assert_stopped_by_sigterm(stop(child));
}

#[test]
fn a_sigterm_right_after_ready_ends_the_server_or_a_second_one_does() {
    let h = Harness::new();
    let t = target(&h);
    let (_, child) = serving(&t);
    assert_stopped_soon_after_ready(&t, stop(child));
    if !t.real {
        // The fake plays the swallowed SIGTERM on request: the second must end it with code 1.
        // Text-only: the projector plays no part in a stop.
        let port = free_port();
        let envs = [("FAKE_LLAMA_SIGTERM", "swallow-first")];
        let mut child = spawn_with(&t, port, &[], &[], &envs);
        wait_healthy(port, &mut child);
        let stopped = stop(child);
        assert!(
            matches!(&stopped, Stopped::BySecondTerm(status) if status.code() == Some(1)),
            "{stopped:?}"
        );
    }
}

#[test]
fn the_whole_lifecycle_through_the_engine() {
    let h = Harness::new();
    let t = target(&h);
    let engine = Engine::launch(engine_config(&h, &t).build().unwrap()).unwrap();
    let pid = engine.pid();
    for (i, rgb) in [[250, 20, 20], [20, 250, 20], [20, 20, 250]]
        .into_iter()
        .enumerate()
    {
        let frame = KeyframeRecord::new(jpeg(&h, &format!("f{i}.jpg"), rgb), i as f64, "contract");
        let scene = engine.describe(&frame).unwrap();
        let value = serde_json::to_value(&scene).unwrap();
        assert!(engine_core::validate_scene_description(&value).is_ok());
    }
    let report = engine.shutdown().unwrap();
    assert_eq!(report.escalation, Escalation::Term);
    assert_eq!(report.status, Some(ChildExit::Code(0)));
    assert!(!tests::alive(pid));
    tests::assert_lock_free(h.gpu);
}

/// The engine's stop right after its start: its readiness waited for the task loop, so the first
/// SIGTERM ends the server with 0, every time.
#[test]
fn the_engine_stops_a_server_it_just_started_with_one_sigterm() {
    let h = Harness::new();
    let t = target(&h);
    for _ in 0..3 {
        let engine = Engine::launch(engine_config(&h, &t).build().unwrap()).unwrap();
        let pid = engine.pid();
        let report = engine.shutdown().unwrap();
        assert_eq!(report.escalation, Escalation::Term);
        assert_eq!(report.status, Some(ChildExit::Code(0)));
        assert!(!tests::alive(pid));
    }
    tests::assert_lock_free(h.gpu);
}

#[test]
fn the_engine_reports_a_taken_port_and_a_missing_model() {
    let h = Harness::new();
    let t = target(&h);
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = Engine::launch(engine_config(&h, &t).port(port).build().unwrap()).unwrap_err();
    assert!(
        err.to_string().contains(&format!("port {port} is taken")),
        "{err}"
    );
    let mut config = engine_config(&h, &t);
    config = config.mmproj(h.dir.path().join("nope.gguf"));
    let err = Engine::launch(config.build().unwrap()).unwrap_err();
    assert!(matches!(
        err,
        engine_core::EngineError::Start(StartError::ModelNotFound {
            role: ModelRole::Mmproj,
            ..
        })
    ));
    tests::assert_lock_free(h.gpu);
}

#[test]
fn eight_slots_describe_every_frame() {
    let h = Harness::new();
    let t = target(&h);
    let engine = Engine::launch(engine_config(&h, &t).slots(8).build().unwrap()).unwrap();
    // The server got the seed's 2048 tokens for each of its 8 slots.
    let (status, body) = tests::http_get(engine.port(), "/props", Some(engine.api_key()));
    assert_eq!(status, 200);
    let props: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(props["total_slots"], 8, "{props}");
    let frames: Vec<KeyframeRecord> = (0..16)
        .map(|i| {
            let rgb = [(i * 15) as u8, 100, 200 - (i * 10) as u8];
            KeyframeRecord::new(
                jpeg(&h, &format!("s{i}.jpg"), rgb),
                f64::from(i),
                "contract",
            )
        })
        .collect();
    let results = engine
        .describe_many(&frames, 8, |_, _| std::ops::ControlFlow::Continue(()))
        .results;
    for result in &results {
        assert!(result.is_ok(), "{result:?}");
    }
    drop(engine);
    tests::assert_lock_free(h.gpu);
}

#[test]
fn a_request_larger_than_its_slot_is_a_context_error_that_is_not_retried() {
    let h = Harness::new();
    let t = target(&h);
    let engine = Engine::launch(engine_config(&h, &t).ctx_size(64).build().unwrap()).unwrap();
    let frame = KeyframeRecord::new(jpeg(&h, "big-prompt.jpg", [9, 90, 180]), 0.0, "contract");
    let err = engine.describe(&frame).unwrap_err();
    assert!(
        matches!(err, RequestError::ContextExhausted { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("raise the context per slot"),
        "{err}"
    );
    drop(engine);
    tests::assert_lock_free(h.gpu);
}

fn anchors() -> engine_core::Schema {
    tests::anchors_schema()
}

#[test]
fn a_text_only_server_takes_plain_content_and_refuses_an_image() {
    let h = Harness::new();
    let t = target(&h);
    let port = free_port();
    let mut child = spawn_text(&t, port);
    wait_healthy(port, &mut child);
    let (status, props) = request(port, "GET", "/props", Some(KEY), None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(props["modalities"]["vision"], false, "{props}");
    let format = json!({"type": "json_schema",
        "json_schema": {"name": "structural_anchors", "schema": anchors().value()}});
    let text = json!({
        "messages": [{"role": "system", "content": "Find the anchors."},
                     {"role": "user", "content": "00:00:01 Who's there?"}],
        "response_format": format, "max_tokens": 128, "temperature": 0.1,
    });
    let (status, answer) =
        request(port, "POST", "/v1/chat/completions", Some(KEY), Some(&text)).unwrap();
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["choices"][0]["message"]["content"].is_string(),
        "{answer}"
    );
    let frame = jpeg(&h, "a.jpg", [200, 10, 10]);
    let image = json!({
        "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, image_part(&frame)]}],
        "response_format": format,
    });
    let (status, error) = request(
        port,
        "POST",
        "/v1/chat/completions",
        Some(KEY),
        Some(&image),
    )
    .unwrap();
    assert_eq!(status, 500, "{error}");
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("image input is not supported"),
        "{error}"
    );
    assert_stopped_by_sigterm(stop(child));
}

/// The anchors in whole seconds within a film's length: llama-server's grammar bounds each number's
/// digits, so even the tiny model's random weights can only give a valid answer.
fn bounded_anchors() -> engine_core::Schema {
    let seconds = json!({"type": "integer", "minimum": 0, "maximum": 20000});
    engine_core::Schema::new(
        "structural_anchors",
        json!({
            "type": "object",
            "properties": {"begin_t": seconds, "escalation_t": seconds, "climax_t": seconds},
            "required": ["begin_t", "escalation_t", "climax_t"],
            "additionalProperties": false,
        }),
    )
    .unwrap()
}

/// CineCut's exact schema leaves numbers unbounded: the tiny model's random weights may write
/// `4E40015904370`, which no f64 holds. Every answer is then valid, or an `InvalidOutput` about the
/// content (never an HTTP, transport or context error).
fn assert_anchors_or_invalid_content(result: Result<Value, RequestError>) {
    match result {
        Ok(value) => assert!(anchors().validate(&value).is_ok(), "{value}"),
        Err(RequestError::InvalidOutput {
            schema, attempts, ..
        }) => {
            assert_eq!(schema, "structural_anchors");
            let about_content = |a: &String| {
                ["content is not JSON", "not a structural_anchors", "cut off"]
                    .iter()
                    .any(|reason| a.contains(reason))
            };
            assert!(attempts.iter().all(about_content), "{attempts:?}");
        }
        Err(other) => panic!("{other}"),
    }
}

#[test]
fn a_text_model_answers_the_anchors_schema_through_the_engine() {
    let h = Harness::new();
    let t = target(&h);
    let engine = Engine::launch(engine_config(&h, &t).text_only().build().unwrap()).unwrap();
    let text = "1\n00:00:01,000 --> 00:00:03,000\nWho's there?";
    let system = "Find the story's structural anchors, in seconds.";
    for _ in 0..3 {
        let bounded = engine_core::Prompt::new(&bounded_anchors(), text).system(system);
        let value: Value = engine.complete(&bounded).unwrap();
        assert!(bounded_anchors().validate(&value).is_ok(), "{value}");
        let exact = engine_core::Prompt::new(&anchors(), text).system(system);
        let result = engine.complete::<Value>(&exact);
        if !t.real {
            assert!(result.is_ok(), "{result:?}");
        }
        assert_anchors_or_invalid_content(result);
    }
    let pid = engine.pid();
    engine.shutdown().unwrap();
    assert!(!tests::alive(pid));
    tests::assert_lock_free(h.gpu);
}

#[test]
fn a_swap_between_the_vision_and_the_text_model_keeps_working() {
    let h = Harness::new();
    let t = target(&h);
    let vision = Engine::launch(engine_config(&h, &t).build().unwrap()).unwrap();
    let frame = KeyframeRecord::new(jpeg(&h, "s.jpg", [10, 200, 10]), 0.0, "contract");
    vision.describe(&frame).unwrap();
    let text = vision
        .swap(
            engine_config(&h, &t).text_only().build().unwrap(),
            Wait::Forever,
        )
        .unwrap();
    let value: Value = text
        .complete(&engine_core::Prompt::new(
            &bounded_anchors(),
            "00:00:01 Run!",
        ))
        .unwrap();
    assert!(bounded_anchors().validate(&value).is_ok(), "{value}");
    let vision = text
        .swap(engine_config(&h, &t).build().unwrap(), Wait::Forever)
        .unwrap();
    vision.describe(&frame).unwrap();
    drop(vision);
    tests::assert_lock_free(h.gpu);
}

/// Every way of holding an answer to its schema works on the server: the engine's own GBNF grammar
/// (the default: no output parse on the server), `response_format` (the server converts the
/// schema), none at all (still validated); `%llguidance` only where the server was built with it
/// (`CONTRACT_LLGUIDANCE=1`), and elsewhere an HTTP error that names the grammar, never a crash.
#[test]
fn every_constraint_answers_or_is_refused_by_name() {
    use engine_core::request::Constraint;
    let h = Harness::new();
    let t = target(&h);
    let llguidance_built = std::env::var_os("CONTRACT_LLGUIDANCE").is_some();
    let frame = KeyframeRecord::new(jpeg(&h, "c.jpg", [120, 40, 200]), 1.0, "contract");
    for constraint in [
        Constraint::Gbnf,
        Constraint::ResponseFormat,
        Constraint::Off,
        Constraint::Llguidance,
    ] {
        // Room for the whitespace the server's own grammar (response_format) lets the tiny model
        // write between the fields: 64 tokens were sometimes cut off.
        let options = engine_core::DescribeOptions::default()
            .constraint(constraint)
            .max_tokens(256)
            .retries(4);
        let config = engine_config(&h, &t).describe_options(options);
        let engine = Engine::launch(config.build().unwrap()).unwrap();
        let outcome = engine.describe(&frame);
        let died = matches!(outcome, Err(RequestError::ServerDied { .. }));
        match (constraint, outcome) {
            // A server built without LLGuidance refuses the grammar (11434) ...
            (Constraint::Llguidance, Err(RequestError::Http { status, body, .. }))
                if t.real && !llguidance_built =>
            {
                assert!((400..600).contains(&status), "{status} {body}");
            }
            // ... or aborts, saying why in its last lines (9093).
            (Constraint::Llguidance, Err(e @ RequestError::ServerDied { .. }))
                if t.real && !llguidance_built =>
            {
                assert!(e.to_string().contains("LLAMA_LLGUIDANCE"), "{e}");
            }
            // Unconstrained, random weights rarely write a scene: any answer must be one.
            (Constraint::Off, Err(RequestError::InvalidOutput { .. })) if t.real => {}
            (_, Ok(scene)) => {
                let value = serde_json::to_value(&scene).unwrap();
                assert!(engine_core::validate_scene_description(&value).is_ok());
            }
            (constraint, Err(e)) => panic!("{constraint:?}: {e}"),
        }
        // A server that died is reaped all the same; its stop says how it ended.
        let stopped = engine.shutdown();
        assert!(stopped.is_ok() || died, "{stopped:?}");
    }
    tests::assert_lock_free(h.gpu);
}

/// The engine starts every server with the prompt cache off (`--cache-ram 0`) where its `--help`
/// lists the flag: both versions list it, and answer with the cache off.
#[test]
fn the_prompt_cache_can_be_turned_off() {
    let h = Harness::new();
    let t = target(&h);
    let help = Command::new(&t.server).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout) + String::from_utf8_lossy(&help.stderr);
    assert!(help.contains("--cache-ram"), "{help}");
    let port = free_port();
    let mut child = spawn_with(&t, port, &[], &["--cache-ram", "0"], &[]);
    wait_healthy(port, &mut child);
    complete_one_token(port);
    assert_stopped_by_sigterm(stop(child));
}

/// The engine's grammar never lets the model write a byte no UTF-8 text holds: llama.cpp's grammar
/// decodes a byte token 0xF5–0xFF as a code point above U+10FFFF, which a negated character class
/// lets through, and the server returns the bytes as runs of U+FFFD (12 of them for a string of 3,
/// past its `maxLength`). The bias pushes exactly those tokens; on the tiny model's byte-level
/// vocabulary a byte's token id is the byte, which `return_tokens` shows (the fake gives the
/// bytes of its answer). Overlong sequences (0xE0 0x80–0x9F …) decode to ordinary code points, so
/// no grammar of code points can keep them out: the engine's validation and retry do.
#[test]
fn the_engines_grammar_never_takes_a_byte_no_utf8_text_holds() {
    let h = Harness::new();
    let t = target(&h);
    let port = free_port();
    let mut child = spawn_text(&t, port);
    wait_healthy(port, &mut child);
    let schema = engine_core::Schema::new(
        "three",
        json!({"type": "object", "properties": {"s": {"type": "string", "minLength": 3, "maxLength": 3}},
               "required": ["s"], "additionalProperties": false}),
    )
    .unwrap();
    let grammar = format!(
        "# json_schema three: {}\n{}",
        schema.value(),
        schema.gbnf().expect("the converter covers it")
    );
    let bias: Vec<Value> = (0xF5..=0xFF).map(|b: u32| json!([b, 30.0])).collect();
    for attempt in 0..4 {
        let body = json!({
            "prompt": format!("Three characters, please ({attempt}):"),
            "grammar": grammar,
            "logit_bias": bias,
            "n_predict": 48,
            "temperature": 0.1,
            "return_tokens": true,
        });
        let (status, answer) =
            request(port, "POST", "/completion", Some(KEY), Some(&body)).unwrap();
        assert_eq!(status, 200, "{answer}");
        let tokens: Vec<u64> = answer["tokens"]
            .as_array()
            .expect("return_tokens gives the ids")
            .iter()
            .map(|id| id.as_u64().unwrap())
            .collect();
        assert!(
            !tokens.iter().any(|id| (0xF5..=0xFF).contains(id)),
            "a byte no UTF-8 text holds was sampled: {tokens:x?} ({})",
            answer["content"]
        );
        let content = answer["content"].as_str().unwrap();
        let value: Value = serde_json::from_str(content).unwrap();
        assert_eq!(
            value["s"].as_str().map(|s| s.chars().count() >= 3),
            Some(true),
            "{content:?}"
        );
    }
    assert_stopped_by_sigterm(stop(child));
}
