//! `nvsmi-shim`: answers `nvidia-smi --query-gpu=FIELDS --format=csv[,noheader][,nounits] [-i N]` the
//! way nvidia-smi does, with knobs (environment variables) for every failure the engine must survive.
//! Run `nvsmi-shim --help` for the knobs.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

const HELP: &str = "\
nvsmi-shim: a stand-in for nvidia-smi's --query-gpu interface.

Usage: nvsmi-shim --query-gpu=FIELDS --format=csv[,noheader][,nounits] [-i N | --id=N]
Fields: index, uuid, name, memory.free, memory.total, memory.used

Knobs (environment variables):
  NVSMI_GPUS=V[,V...]    free MiB per GPU, one entry per GPU (default 79000). Entries are printed
                         as given, so [N/A] or [Insufficient Permissions] work per GPU.
  NVSMI_FREE_FILE=PATH   read the NVSMI_GPUS list from PATH at each call (tests change it between calls)
  NVSMI_GPU_COUNT=N      N GPUs, each with the first NVSMI_GPUS value (default: NVSMI_GPUS's length)
  NVSMI_ONLY=I[,I...]    list only these GPUs (by index): a machine whose GPUs are these
  NVSMI_TOTAL_MIB=N      total MiB per GPU (default 81559)
  NVSMI_NAME=S           GPU name (default \"NVIDIA H100 80GB HBM3\")
  NVSMI_OUTPUT=TEXT      print TEXT instead of the query answer (garbage, spaces, nothing: NVSMI_OUTPUT=)
  NVSMI_EXIT=CODE        fail with CODE; 9 prints the real \"couldn't communicate with the NVIDIA
                         driver\" message (stdout, as nvidia-smi does)
  NVSMI_MESSAGE=TEXT     the failure message instead
  NVSMI_DELAY_MS=N       answer after N ms
  NVSMI_HANG=1           never answer (until killed)
  NVSMI_LOG=PATH         append one line per call: \"pid=PID ARGS...\"
";

const DRIVER_MESSAGE: &str = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA \
driver. Make sure that the latest NVIDIA driver is installed and running.";

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

struct Query {
    fields: Vec<String>,
    header: bool,
    units: bool,
    id: Option<usize>,
}

fn parse_args(args: &[String]) -> Result<Query, (u8, String)> {
    let mut fields = None;
    let mut format = None;
    let mut id = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next().cloned());
        match flag {
            "--query-gpu" => fields = value(),
            "--format" => format = value(),
            "-i" | "--id" => {
                let v = value().unwrap_or_default();
                id = Some(
                    v.parse::<usize>()
                        .map_err(|_| (2, format!("Invalid GPU id: {v}")))?,
                );
            }
            _ => return Err((2, format!("Invalid combination of input arguments: {arg}"))),
        }
    }
    let fields = fields.ok_or((2, "Query must be specified with --query-gpu".to_string()))?;
    let format = format.ok_or((2, "Format must be specified with --format".to_string()))?;
    let options: Vec<&str> = format.split(',').map(str::trim).collect();
    if options.first() != Some(&"csv") {
        return Err((2, format!("Unknown format: {format}")));
    }
    let fields: Vec<String> = fields.split(',').map(|f| f.trim().to_string()).collect();
    for field in &fields {
        if !matches!(
            field.as_str(),
            "index" | "uuid" | "name" | "memory.free" | "memory.total" | "memory.used"
        ) {
            return Err((
                2,
                format!("Field \"{field}\" is not a valid field to query."),
            ));
        }
    }
    Ok(Query {
        fields,
        header: !options.contains(&"noheader"),
        units: !options.contains(&"nounits"),
        id,
    })
}

fn answer(query: &Query) -> Result<String, (u8, String)> {
    let from_file = env("NVSMI_FREE_FILE").and_then(|path| std::fs::read_to_string(path).ok());
    let gpus: Vec<String> = from_file
        .or_else(|| env("NVSMI_GPUS"))
        .unwrap_or_else(|| "79000".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let gpus: Vec<String> = match env("NVSMI_GPU_COUNT").and_then(|n| n.parse::<usize>().ok()) {
        Some(n) => vec![gpus[0].clone(); n],
        None => gpus,
    };
    let total: u64 = env("NVSMI_TOTAL_MIB")
        .and_then(|v| v.parse().ok())
        .unwrap_or(81559);
    let name = env("NVSMI_NAME").unwrap_or_else(|| "NVIDIA H100 80GB HBM3".into());
    let only: Option<Vec<usize>> = env("NVSMI_ONLY").map(|list| {
        list.split(',')
            .filter_map(|i| i.trim().parse().ok())
            .collect()
    });
    let listed = |i: &usize| *i < gpus.len() && only.as_ref().is_none_or(|o| o.contains(i));
    let selected: Vec<usize> = match query.id {
        Some(i) if listed(&i) => vec![i],
        Some(_) => return Err((6, "No devices were found".into())),
        None => (0..gpus.len()).filter(listed).collect(),
    };
    let mib = |v: String| if query.units { format!("{v} MiB") } else { v };
    let mut out = String::new();
    if query.header {
        let names: Vec<String> = query
            .fields
            .iter()
            .map(|f| {
                if f.starts_with("memory.") && query.units {
                    format!("{f} [MiB]")
                } else {
                    f.clone()
                }
            })
            .collect();
        out.push_str(&names.join(", "));
        out.push('\n');
    }
    for i in selected {
        let free = &gpus[i];
        let values: Vec<String> = query
            .fields
            .iter()
            .map(|f| match f.as_str() {
                "index" => i.to_string(),
                "uuid" => format!(
                    "GPU-{:08x}-5eed-4c1e-8a11-{:012x}",
                    0xc1ec0000u32 + i as u32,
                    i
                ),
                "name" => name.clone(),
                "memory.free" => mib(free.clone()),
                "memory.total" => mib(total.to_string()),
                _ => match free.parse::<u64>() {
                    Ok(free) => mib(total.saturating_sub(free).to_string()),
                    Err(_) => free.clone(),
                },
            })
            .collect();
        out.push_str(&values.join(", "));
        out.push('\n');
    }
    Ok(out)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(log) = env("NVSMI_LOG")
        && let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
    {
        let _ = writeln!(file, "pid={} {}", std::process::id(), args.join(" "));
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{HELP}");
        return ExitCode::SUCCESS;
    }
    if env("NVSMI_HANG").is_some_and(|v| v == "1") {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    if let Some(ms) = env("NVSMI_DELAY_MS").and_then(|v| v.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    if let Some(code) = env("NVSMI_EXIT").and_then(|v| v.parse::<u8>().ok()) {
        let message = env("NVSMI_MESSAGE").unwrap_or_else(|| {
            if code == 9 {
                DRIVER_MESSAGE.into()
            } else {
                format!("nvidia-smi failed (code {code})")
            }
        });
        println!("{message}");
        return ExitCode::from(code);
    }
    let query = match parse_args(&args) {
        Ok(query) => query,
        Err((code, message)) => {
            println!("{message}");
            return ExitCode::from(code);
        }
    };
    if let Some(text) = env("NVSMI_OUTPUT") {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    match answer(&query) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err((code, message)) => {
            println!("{message}");
            ExitCode::from(code)
        }
    }
}
