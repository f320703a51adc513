//! `cinecut-infer run` (any model, any schema) and the knobs and conventions `describe` gained with
//! it, end to end against the fake server and the shim.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::{Value, json};
use tests::Harness;

const ANCHORS: &str = r#"{"type": "object",
  "properties": {"begin_t": {"type": "number"}, "escalation_t": {"type": "number"},
                 "climax_t": {"type": "number"}},
  "required": ["begin_t", "escalation_t", "climax_t"], "additionalProperties": false}"#;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout_lines(out: &Output) -> Vec<Value> {
    tests::json_lines(&String::from_utf8_lossy(&out.stdout))
}

fn write(h: &Harness, name: &str, text: &str) -> PathBuf {
    let path = h.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn records(h: &Harness, name: &str, lines: &[Value]) -> PathBuf {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    write(h, name, &text)
}

/// `run` with the anchors schema and a prompt, on `inputs`.
fn run(h: &Harness, knobs: &[(&str, &str)], extra: &[&str], inputs: &[&Path]) -> Output {
    let schema = write(h, "anchors.json", ANCHORS);
    h.run_command(knobs)
        .arg("--schema")
        .arg(&schema)
        .args(["--prompt", "Find the structural anchors."])
        .args(extra)
        .args(inputs)
        .output()
        .unwrap()
}

fn anchors_schema() -> engine_core::Schema {
    engine_core::Schema::new("anchors", serde_json::from_str(ANCHORS).unwrap()).unwrap()
}

fn spawned_args(h: &Harness) -> Vec<String> {
    h.spawned_args()
        .into_iter()
        .next()
        .expect("a server was spawned")
}

#[test]
fn records_are_answered_in_order_with_their_ids_and_sources() {
    let h = Harness::new();
    let input = records(
        &h,
        "chunks.jsonl",
        &[
            json!({"id": "chunk-1", "text": "00:00:01 Who's there?", "source": "subtitles"}),
            json!({"id": 2, "text": "00:01:10 Run!"}),
            json!({"id": "chunk-3", "text": "00:02:30 It's over."}),
        ],
    );
    let out = run(&h, &[], &["--slots", "2"], &[&input]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = stdout_lines(&out);
    let ids: Vec<&Value> = lines.iter().map(|l| &l["id"]).collect();
    assert_eq!(ids, [&json!("chunk-1"), &json!(2), &json!("chunk-3")]);
    assert_eq!(lines[0]["source"], "subtitles");
    assert!(lines[1].get("source").is_none(), "{}", lines[1]);
    for line in &lines {
        assert!(anchors_schema().validate(&line["result"]).is_ok(), "{line}");
    }
    assert!(
        stderr(&out).contains("3 answered, 0 failed, 0 not attempted, of 3 records"),
        "{}",
        stderr(&out)
    );
    // Text-only: the server got no projector.
    assert!(!spawned_args(&h).iter().any(|a| a == "--mmproj"));
    h.assert_clean();
}

#[test]
fn images_for_a_text_model_are_refused_before_any_server() {
    let h = Harness::new();
    h.jpeg("kf/a.jpg", 16, 16, [1, 2, 3]);
    let input = records(
        &h,
        "in.jsonl",
        &[
            json!({"id": 1, "text": "fine"}),
            json!({"id": 2, "text": "look", "images": ["kf/a.jpg"]}),
        ],
    );
    let out = run(&h, &[], &[], &[&input]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("record 2 has images, but the model runs text-only"),
        "{}",
        stderr(&out)
    );
    assert!(h.spawned_pids().is_empty(), "no server was started");
    h.assert_clean();
}

#[test]
fn a_vision_model_answers_records_with_images() {
    let h = Harness::new();
    h.jpeg("kf/a.jpg", 16, 16, [1, 2, 3]);
    let input = records(
        &h,
        "in.jsonl",
        &[json!({"id": "a", "images": ["kf/a.jpg"]})],
    );
    let mmproj = h.mmproj.to_str().unwrap();
    let out = run(&h, &[], &["--mmproj", mmproj], &[&input]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        anchors_schema()
            .validate(&stdout_lines(&out)[0]["result"])
            .is_ok()
    );
    h.assert_clean();
}

#[test]
fn resume_skips_answered_ids_and_progress_json_names_each_record() {
    let h = Harness::new();
    let output = h.dir.path().join("out.jsonl");
    let output_arg = output.to_str().unwrap();
    let first = records(
        &h,
        "a.jsonl",
        &[
            json!({"id": 1, "text": "a"}),
            json!({"id": "1", "text": "b"}),
        ],
    );
    let out = run(&h, &[], &["--output", output_arg], &[&first]);
    assert!(out.status.success(), "{}", stderr(&out));
    let more = records(&h, "b.jsonl", &[json!({"id": 3, "text": "c"})]);
    let out = run(
        &h,
        &[],
        &["--output", output_arg, "--resume", "--progress", "json"],
        &[&first, &more],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("resuming: 2 of 3 records already answered"),
        "{}",
        stderr(&out)
    );
    let progress: Vec<Value> = stderr(&out)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        progress,
        [json!({"done": 1, "total": 1, "failed": 0, "id": 3, "ok": true})]
    );
    let written = tests::json_lines(&std::fs::read_to_string(&output).unwrap());
    let ids: Vec<&Value> = written.iter().map(|l| &l["id"]).collect();
    assert_eq!(ids, [&json!(1), &json!("1"), &json!(3)]);
    let requests = h
        .server_events()
        .iter()
        .filter(|e| e["event"] == "request_start")
        .count();
    assert_eq!(requests, 3, "the resumed run asked only for id 3");
    h.assert_clean();
}

#[test]
fn server_and_request_knobs_reach_the_server() {
    let h = Harness::new();
    let input = records(&h, "in.jsonl", &[json!({"id": 1, "text": "x"})]);
    let out = run(
        &h,
        &[],
        &[
            "--gpu-layers",
            "12",
            "--ctx-size",
            "1024",
            "--slots",
            "3",
            "--server-arg=--jinja",
            "--server-arg",
            "--seed",
            "--server-arg",
            "7",
            "--max-tokens",
            "64",
            "--temperature",
            "0.5",
            "--retries",
            "0",
        ],
        &[&input],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let args = spawned_args(&h).join(" ");
    assert!(args.contains("-ngl 12 -c 3072 -np 3"), "{args}");
    // The extra arguments as given, then what the server's --help offers (the cache off).
    assert!(args.ends_with("--jinja --seed 7 --cache-ram 0"), "{args}");
    let request = &requests(&h)[0];
    assert_eq!(request["max_tokens"], 64);
    assert_eq!(request["temperature"], 0.5);
    assert_eq!(request["schema_name"], "anchors");
    assert_eq!(request["text"], "Find the structural anchors.\n\nx");
    h.assert_clean();
}

fn requests(h: &Harness) -> Vec<Value> {
    h.events_named("request_start")
}

#[test]
fn retries_bound_the_requests_and_describe_takes_its_instruction_from_a_file() {
    let h = Harness::new();
    let input = records(&h, "in.jsonl", &[json!({"id": 1, "text": "x"})]);
    let out = run(
        &h,
        &[("FAKE_LLAMA_RESPONSE", "not-json")],
        &["--retries", "1"],
        &[&input],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(requests(&h).len(), 2, "one try and one retry");
    let error = stdout_lines(&out)[0]["error"].as_str().unwrap().to_string();
    assert!(
        error.contains("no valid anchors after 2 attempt(s)"),
        "{error}"
    );

    let h = Harness::new();
    let instruction = write(
        &h,
        "prompt.txt",
        "Describe the shot for a horror trailer.\n",
    );
    let out = h
        .describe_command(&[])
        .arg("--prompt-file")
        .arg(&instruction)
        .args(["--max-tokens", "300"])
        .arg(h.jpeg("f.jpg", 16, 16, [1, 2, 3]))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let request = &requests(&h)[0];
    assert_eq!(request["text"], "Describe the shot for a horror trailer.");
    assert_eq!(request["max_tokens"], 300);
    assert_eq!(request["schema_name"], "SceneDescription");
    h.assert_clean();
}

#[test]
fn bad_run_arguments_are_refused_before_any_server() {
    let h = Harness::new();
    let input = records(&h, "in.jsonl", &[json!({"id": 1, "text": "x"})]);
    let schema = write(&h, "anchors.json", ANCHORS);
    let broken = write(&h, "broken.json", "{\"type\": ");
    let duplicate = records(
        &h,
        "dup.jsonl",
        &[json!({"id": 1, "text": "x"}), json!({"id": 1, "text": "y"})],
    );
    let cases: Vec<(Vec<&std::ffi::OsStr>, &str)> = vec![
        (
            vec![schema.as_os_str(), input.as_os_str()],
            "give --prompt TEXT or --prompt-file FILE",
        ),
        (
            vec![
                broken.as_os_str(),
                "--prompt".as_ref(),
                "x".as_ref(),
                input.as_os_str(),
            ],
            "broken.json: not JSON",
        ),
        (
            vec![
                schema.as_os_str(),
                "--prompt".as_ref(),
                "x".as_ref(),
                duplicate.as_os_str(),
            ],
            "id 1 was already used",
        ),
        (
            vec![
                schema.as_os_str(),
                "--prompt-file".as_ref(),
                "/no/prompt.txt".as_ref(),
                input.as_os_str(),
            ],
            "cannot read --prompt-file /no/prompt.txt",
        ),
    ];
    for (args, needle) in cases {
        let out = h
            .run_command(&[])
            .arg("--schema")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{needle}: {}", stderr(&out));
    }
    assert!(h.spawned_pids().is_empty());
    h.assert_clean();
}

#[test]
fn cinecut_keyframe_names_give_timestamps_and_record_sources_are_kept() {
    let h = Harness::new();
    h.jpeg("kf/frame_0000012500.jpg", 16, 16, [1, 2, 3]);
    h.jpeg("kf/frame_0000083250.jpg", 16, 16, [3, 2, 1]);
    let keyframes = records(
        &h,
        "keyframes.jsonl",
        &[
            json!({"timestamp_s": 99.5, "frame_path": "kf/frame_0000012500.jpg", "source": "subtitle"}),
        ],
    );
    let out = h
        .describe_command(&[])
        .arg(h.dir.path().join("kf"))
        .arg(&keyframes)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = stdout_lines(&out);
    let heads: Vec<(f64, Option<&str>)> = lines
        .iter()
        .map(|l| (l["timestamp_s"].as_f64().unwrap(), l["source"].as_str()))
        .collect();
    assert_eq!(
        heads,
        [(12.5, None), (83.25, None), (99.5, Some("subtitle"))]
    );
    h.assert_clean();
}

#[test]
fn model_paths_default_from_cinecut_models_dir_and_a_missing_default_is_named() {
    let h = Harness::new();
    let models = h.dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    std::fs::copy(&h.model, models.join("ggml-model-q4_k.gguf")).unwrap();
    let frame = h.jpeg("f.jpg", 16, 16, [1, 2, 3]);
    let describe = |dir: &Path| {
        h.infer_command("describe", &h.gpu.to_string(), &[])
            .env("CINECUT_MODELS_DIR", dir)
            .arg(&frame)
            .output()
            .unwrap()
    };
    let out = describe(&models);
    assert_eq!(out.status.code(), Some(2));
    let expected = models.join("mmproj-model-f16.gguf");
    assert!(
        stderr(&out).contains(&format!(
            "the default {} (from CINECUT_MODELS_DIR) does not exist",
            expected.display()
        )),
        "{}",
        stderr(&out)
    );
    std::fs::copy(&h.mmproj, &expected).unwrap();
    let out = describe(&models);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        spawned_args(&h)
            .join(" ")
            .contains(&format!("--mmproj {}", expected.display()))
    );
    h.assert_clean();
}
