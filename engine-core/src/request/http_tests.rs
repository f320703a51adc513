//! The describe client against wiremock: the request's shape, status handling, timeouts, retries.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use super::error::RequestError;
use super::options::DescribeOptions;
use super::scene::{KeyframeRecord, SceneDescription};
use super::send::{Modality, Transport, complete};
use crate::server::Client;
use crate::server::ServerDeath;

const KEY: &str = "test-key";

fn chat(content: &str, finish: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "choices": [{"index": 0, "finish_reason": finish,
                     "message": {"role": "assistant", "content": content}}],
        "object": "chat.completion",
    }))
}

const VALID: &str =
    r#"{"visual_content":"a red car","mood":"tense","action":"chase","setting":"night"}"#;

struct Setup {
    server: MockServer,
    _dir: tempfile::TempDir,
    frame: KeyframeRecord,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("frame.jpg");
    std::fs::write(&path, [0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3]).unwrap();
    Setup {
        server: MockServer::start().await,
        frame: KeyframeRecord::new(path, 1.0, "test"),
        _dir: dir,
    }
}

/// Runs the blocking describe on a worker thread; `dead` is what the death check answers.
async fn describe(
    s: &Setup,
    options: DescribeOptions,
    dead: bool,
) -> Result<SceneDescription, RequestError> {
    let port = s.server.address().port();
    let frame = s.frame.clone();
    tokio::task::spawn_blocking(move || {
        let client = Client::new(port, KEY, 1);
        let prompt = options.frame_prompt(&frame.frame_path);
        complete(
            &client,
            &options,
            Modality::Vision(Transport::Inline),
            &prompt,
            &|_| {
                dead.then(|| RequestError::ServerDied {
                    during: None,
                    death: ServerDeath::new(crate::process::ChildExit::Signal(9), String::new()),
                })
            },
        )
    })
    .await
    .unwrap()
    .map(|answer| answer.value)
}

#[tokio::test]
async fn request_has_the_shape_the_real_server_needs() {
    let s = setup().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .and(header("content-type", "application/json"))
        .and(|request: &Request| {
            let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
            let parts = &body["messages"][0]["content"];
            parts[0]["type"] == "text"
                && parts[0]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("trailer"))
                && parts[1]["type"] == "image_url"
                && parts[1]["image_url"]["url"] == "data:image/jpeg;base64,/9j/4AECAw=="
                && body["grammar"]
                    .as_str()
                    .is_some_and(|g| g.contains("\"\\\"visual_content\\\"\""))
                && body.get("response_format").is_none()
                && body["max_tokens"] == 512
                && body["stream"] == false
                && body["temperature"].as_f64().is_some_and(|t| t < 0.5)
        })
        .respond_with(chat(VALID, "stop"))
        .expect(1)
        .mount(&s.server)
        .await;
    let scene = describe(&s, DescribeOptions::default(), false)
        .await
        .unwrap();
    assert_eq!(scene.visual_content, "a red car");
}

#[tokio::test]
async fn invalid_answers_are_retried_until_a_valid_one() {
    let s = setup().await;
    Mock::given(method("POST"))
        .respond_with(chat("not json at all", "stop"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&s.server)
        .await;
    Mock::given(method("POST"))
        .respond_with(chat(&VALID[..20], "length"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&s.server)
        .await;
    Mock::given(method("POST"))
        .respond_with(chat(&format!("```json\n{VALID}\n```"), "stop"))
        .expect(1)
        .mount(&s.server)
        .await;
    let scene = describe(&s, DescribeOptions::default(), false)
        .await
        .unwrap();
    assert_eq!(scene.mood, "tense");
}

#[tokio::test]
async fn retries_are_bounded_and_every_reason_is_kept() {
    let s = setup().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_body_json(json!({"error": {"code": 500,
            "message": "The model produced output that does not match the expected peg-native format",
            "type": "server_error"}})))
        .up_to_n_times(1)
        .mount(&s.server)
        .await;
    Mock::given(method("POST"))
        .respond_with(chat(r#"{"visual_content":"x","mood":3}"#, "stop"))
        .expect(3)
        .mount(&s.server)
        .await;
    let err = describe(&s, DescribeOptions::default().retries(3), false)
        .await
        .unwrap_err();
    match &err {
        RequestError::InvalidOutput {
            subject,
            schema,
            attempts,
        } => {
            assert_eq!(
                subject,
                &crate::request::Subject::Frame(s.frame.frame_path.clone())
            );
            assert_eq!(schema, "SceneDescription");
            assert_eq!(attempts.len(), 4);
            assert!(attempts[0].contains("peg-native"), "{attempts:?}");
            assert!(attempts[1].contains("mood"), "{attempts:?}");
            assert!(
                attempts[1].contains(r#"{"visual_content":"x","mood":3}"#),
                "raw text kept"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("frame.jpg"));
}

#[tokio::test]
async fn an_http_error_is_reported_with_status_and_body_without_retry() {
    let s = setup().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(400).set_body_json(json!({"error": {"code": 400,
            "message": "Failed to load image or audio file", "type": "invalid_request_error"}})),
        )
        .expect(1)
        .mount(&s.server)
        .await;
    let err = describe(&s, DescribeOptions::default(), false)
        .await
        .unwrap_err();
    match &err {
        RequestError::Http { status, body, .. } => {
            assert_eq!(*status, 400);
            assert!(body.contains("Failed to load image"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_slow_answer_times_out() {
    let s = setup().await;
    Mock::given(method("POST"))
        .respond_with(chat(VALID, "stop").set_delay(Duration::from_secs(2)))
        .mount(&s.server)
        .await;
    let options = DescribeOptions::default().request_timeout(Duration::from_millis(100));
    let err = describe(&s, options, false).await.unwrap_err();
    assert!(
        matches!(&err, RequestError::Timeout { timeout, .. } if *timeout == Duration::from_millis(100)),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_refused_connection_from_a_dead_server_says_it_died() {
    let s = setup().await;
    // A port nobody listens on (wiremock pools its servers, so dropping one does not close it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let frame = s.frame.clone();
    let (alive, dead) = tokio::task::spawn_blocking(move || {
        let client = Client::new(port, KEY, 1);
        let options = DescribeOptions::default();
        let prompt = options.frame_prompt(&frame.frame_path);
        let send = |death: &dyn Fn(Duration) -> Option<RequestError>| {
            complete::<SceneDescription>(
                &client,
                &options,
                Modality::Vision(Transport::Inline),
                &prompt,
                death,
            )
        };
        let alive = send(&|_| None);
        let dead = send(&|_| {
            Some(RequestError::ServerDied {
                during: None,
                death: ServerDeath::new(crate::process::ChildExit::Code(1), String::new()),
            })
        });
        (alive, dead)
    })
    .await
    .unwrap();
    assert!(
        matches!(alive, Err(RequestError::Transport { .. })),
        "{alive:?}"
    );
    assert!(
        matches!(dead, Err(RequestError::ServerDied { .. })),
        "{dead:?}"
    );
}

#[tokio::test]
async fn bad_frames_are_refused_before_any_request() {
    let s = setup().await;
    Mock::given(method("POST"))
        .respond_with(chat(VALID, "stop"))
        .expect(0)
        .mount(&s.server)
        .await;
    let dir = s._dir.path();
    let cases: Vec<(PathBuf, &str, DescribeOptions)> = vec![
        (
            dir.join("missing.jpg"),
            "file not found",
            DescribeOptions::default(),
        ),
        (dir.to_path_buf(), "is a folder", DescribeOptions::default()),
        (
            write(dir, "empty.jpg", b""),
            "empty",
            DescribeOptions::default(),
        ),
        (
            write(dir, "text.jpg", b"hello world"),
            "not a JPEG or PNG",
            DescribeOptions::default(),
        ),
        (
            write(dir, "big.jpg", &[0xFF, 0xD8, 0xFF, 0, 0, 0, 0, 0]),
            "over the 4-byte limit",
            DescribeOptions::default().max_frame_bytes(4),
        ),
    ];
    let port = s.server.address().port();
    for (path, needle, options) in cases {
        let frame = KeyframeRecord::new(&path, 0.0, "test");
        let result = tokio::task::spawn_blocking(move || {
            let prompt = options.frame_prompt(&frame.frame_path);
            let client = Client::new(port, KEY, 1);
            complete::<SceneDescription>(
                &client,
                &options,
                Modality::Vision(Transport::Inline),
                &prompt,
                &|_| None,
            )
        })
        .await
        .unwrap();
        let err = result.unwrap_err();
        assert!(matches!(err, RequestError::BadImage { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(needle), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
    }
}

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}
