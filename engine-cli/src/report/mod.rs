//! `cinecut-infer report RESULTS.jsonl [--summary FILE] [--output FILE]`: a run's lines as one
//! self-contained HTML contact sheet — every frame's thumbnail (downscaled and embedded) beside its
//! description or its error, `run` answers as their JSON, the counts, throughput and latency charts
//! (inline SVG), and a filter and a search (a few lines of script; with scripts off everything
//! shows). It opens with no network: nothing is fetched.
//!
//! Two passes over the file: the first reads only the text (counts, timings), the second writes one
//! card at a time, decoding one image at a time, straight into the output: 20 000 lines never hold
//! more than one decoded frame.

mod chart;
mod thumb;

use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use engine_core::CancellationToken;
use serde::Deserialize;
use serde_json::Value;

use crate::cli::ReportArgs;
use crate::exit::{Exit, Failure, Outcome as CommandOutcome};
use crate::outfile::write_streamed;

const STYLE: &str = include_str!("style.css");
const SCRIPT: &str = include_str!("filter.js");

/// What the first pass found.
#[derive(Debug, Default, PartialEq)]
pub struct Scan {
    pub lines: usize,
    pub answered: usize,
    pub failed: usize,
    pub not_attempted: usize,
    /// Each answered line's latency (ms) and end (s from the run's start), from `--timings`.
    pub latencies_ms: Vec<f64>,
    pub finished_s: Vec<f64>,
    /// A torn last line (an interrupted run) was left out.
    pub torn_last_line: Option<usize>,
}

/// The numbers of `--summary`'s file the page shows, read as numbers (a file whose values are not
/// numbers is refused: nothing from it reaches the page but numbers and one checked date).
#[derive(Debug, Deserialize)]
pub struct RunNumbers {
    items: u64,
    items_per_s: f64,
    wall_s: f64,
    latency_ms: LatencyNumbers,
    tokens: TokenNumbers,
    started_at: String,
}

#[derive(Debug, Deserialize)]
struct LatencyNumbers {
    p50: f64,
    p95: f64,
    max: f64,
}

#[derive(Debug, Deserialize)]
struct TokenNumbers {
    prompt: u64,
    generated: u64,
}

impl RunNumbers {
    /// Reads `path` as the file `--summary` wrote; the error says what is wrong with it.
    fn read(path: &Path) -> Result<RunNumbers, String> {
        let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
        if !meta.is_file() || meta.len() > crate::jsonl::MAX_LINE {
            return Err("not a regular file of a summary's size".into());
        }
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let numbers: RunNumbers = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let moment = numbers.started_at.as_bytes();
        let plain = moment.len() <= 40 && moment.iter().all(|b| b"0123456789-:.TZ+".contains(b));
        if !plain {
            return Err(format!(
                "started_at {:?} is not an RFC 3339 moment",
                numbers.started_at
            ));
        }
        let _ = numbers.items;
        Ok(numbers)
    }
}

/// How a line ended.
fn outcome(line: &Value) -> Outcome {
    if line.get("scene").is_some() || line.get("result").is_some() {
        Outcome::Answered
    } else if line["error"]
        .as_str()
        .is_some_and(|e| e.contains("not attempted —"))
    {
        // engine-core's RequestError::{Cancelled, NoServerLeft}: the item was never sent.
        Outcome::NotAttempted
    } else {
        Outcome::Failed
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Answered,
    Failed,
    NotAttempted,
}

/// The first pass: every line parsed and counted; a shard's file refused (merge first), and an
/// `output` that is one of the frames.
pub fn scan(results: &Path, output: &Path) -> Result<Scan, String> {
    let base = results.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut scan = Scan::default();
    crate::jsonl::each_line(results, |n, text, ended| {
        if scan.torn_last_line.is_some() {
            return Err(format!("{} line {}: not JSON", results.display(), n - 1));
        }
        let line: Value = match serde_json::from_str(text) {
            Ok(line) => line,
            // Possibly the last line an interrupted run left half written (as --resume and merge
            // take it): left out if no line follows.
            Err(_) if !ended => {
                scan.torn_last_line = Some(n);
                return Ok(());
            }
            Err(e) => return Err(format!("{} line {n}: not JSON ({e})", results.display())),
        };
        if line.get("index").is_some() && line.get("of").is_some() {
            return Err(format!(
                "{} is one shard of a sharded job (its lines carry \"index\" and \"of\"): merge the \
                 shards first — cinecut-infer merge scenes.jsonl scenes.*.jsonl — and report the \
                 merged file",
                results.display()
            ));
        }
        if line.get("frame_path").is_none() && line.get("id").is_none() {
            return Err(format!(
                "{} line {n}: neither a frame's line (frame_path) nor a record's (id) — give the \
                 output of describe or run",
                results.display()
            ));
        }
        if let Some(image) = images(&line)
            .iter()
            .find(|image| crate::outfile::same_file(&resolve(image, &base), output))
        {
            return Err(format!(
                "--output {} is {}, an image of line {n}: writing it would destroy it — choose \
                 another file",
                output.display(),
                image.display()
            ));
        }
        scan.lines += 1;
        match outcome(&line) {
            Outcome::Answered => scan.answered += 1,
            Outcome::Failed => scan.failed += 1,
            Outcome::NotAttempted => scan.not_attempted += 1,
        }
        if let Some(ms) = line["timings"]["latency_ms"].as_f64() {
            scan.latencies_ms.push(ms);
        }
        if let Some(s) = line["timings"]["finished_s"].as_f64() {
            scan.finished_s.push(s);
        }
        Ok(())
    })?;
    Ok(scan)
}

/// The images a line names: its frame, or a record's `images`.
fn images(line: &Value) -> Vec<PathBuf> {
    match line.get("frame_path").and_then(Value::as_str) {
        Some(frame) => vec![PathBuf::from(frame)],
        None => line["images"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i.as_str().map(PathBuf::from))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

pub fn command(args: ReportArgs) -> CommandOutcome {
    let refuse = |message: String| Err(Failure::refused(message));
    if crate::outfile::same_file(&args.output, &args.results) {
        return refuse(format!(
            "--output {} is the results file: writing it would destroy it — choose another file",
            args.output.display()
        ));
    }
    if let Some(summary) = &args.summary
        && crate::outfile::same_file(&args.output, summary)
    {
        return refuse(format!(
            "--output {} is the --summary file: writing it would destroy it — choose another file",
            args.output.display()
        ));
    }
    crate::outfile::check_writable(&args.output).map_err(|e| format!("--output {e}"))?;
    // Two passes read the file twice: a pipe or a FIFO would give its lines once (or block).
    match std::fs::metadata(&args.results) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => {
            return refuse(format!(
                "{} is not a regular file (a pipe or a device): report reads its results twice — \
                 save them to a file first",
                args.results.display()
            ));
        }
        Err(e) => return refuse(format!("cannot read {}: {e}", args.results.display())),
    }
    let scan = scan(&args.results, &args.output)?;
    let summary = match &args.summary {
        None => None,
        Some(path) => Some(RunNumbers::read(path).map_err(|e| {
            format!(
                "--summary {}: {e} — give the file --summary wrote",
                path.display()
            )
        })?),
    };
    if let Some(n) = scan.torn_last_line {
        eprintln!(
            "cinecut-infer: {} line {n} is torn (an interrupted run): left out",
            args.results.display()
        );
    }
    let stop = crate::signals::stop_on_signals();
    let base = args
        .results
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    write_streamed(&args.output, &stop, |out| {
        write_page(out, &args.results, &base, &scan, summary.as_ref(), &stop)
    })?;
    eprintln!(
        "cinecut-infer: wrote {} ({} cards: {} answered, {} failed, {} not attempted)",
        args.output.display(),
        scan.lines,
        scan.answered,
        scan.failed,
        scan.not_attempted
    );
    Ok(Exit::Done)
}

/// `&`, `<`, `>`, `"` and `'` as HTML entities.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Seconds as `hh:mm:ss.mmm` (`-` before a negative time).
pub fn timestamp(seconds: f64) -> String {
    let ms = (seconds.abs() * 1000.0).round() as u64;
    format!(
        "{}{:02}:{:02}:{:02}.{:03}",
        if seconds < 0.0 { "-" } else { "" },
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

fn write_page(
    out: &mut dyn Write,
    results: &Path,
    base: &Path,
    scan: &Scan,
    summary: Option<&RunNumbers>,
    stop: &CancellationToken,
) -> io::Result<()> {
    let title = format!(
        "{} — cinecut-infer report",
        results
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n",
        escape(&title)
    )?;
    write!(out, "<h1>{}</h1>\n<p class=\"counts\">", escape(&title))?;
    for (class, n, what) in [
        ("answered-count", scan.answered, "answered"),
        ("failed-count", scan.failed, "failed"),
        ("", scan.not_attempted, "not attempted"),
        ("", scan.lines, "in all"),
    ] {
        write!(out, "<span class=\"{class}\"><b>{n}</b> {what}</span>")?;
    }
    writeln!(out, "</p>")?;
    write_charts(out, scan, summary)?;
    writeln!(
        out,
        "<div class=\"tools\" id=\"tools\" hidden><label><input type=\"checkbox\" id=\"failed-only\"> \
         failed only</label> <input type=\"search\" id=\"search\" placeholder=\"search the \
         descriptions\"> <span id=\"shown\"></span></div>\n<main class=\"grid\">"
    )?;
    let mut written = Ok(());
    crate::jsonl::each_line(results, |n, text, _| {
        if stop.is_cancelled() {
            return Err("interrupted".into());
        }
        if scan.torn_last_line == Some(n) {
            return Ok(());
        }
        let line: Value = serde_json::from_str(text).map_err(|e| format!("line {n}: {e}"))?;
        written = out.write_all(card(&line, base).as_bytes());
        written.as_ref().map(|_| ()).map_err(|e| e.to_string())
    })
    .map_err(io::Error::other)?;
    written?;
    write!(out, "</main>\n<script>{SCRIPT}</script>\n</body></html>\n")
}

fn write_charts(out: &mut dyn Write, scan: &Scan, summary: Option<&RunNumbers>) -> io::Result<()> {
    let mut figures = String::new();
    if !scan.finished_s.is_empty() {
        figures.push_str(&chart::throughput(&scan.finished_s));
    }
    if !scan.latencies_ms.is_empty() {
        figures.push_str(&chart::latency(&scan.latencies_ms));
    }
    if let Some(s) = summary {
        let _ = write!(
            figures,
            "<figure><figcaption>the run (--summary)</figcaption><p>{:.2} items/s over {:.2} s of \
             wall time; latency p50 {:.2} ms, p95 {:.2} ms, max {:.2} ms; {} prompt and {} \
             generated tokens; started {}</p></figure>",
            s.items_per_s,
            s.wall_s,
            s.latency_ms.p50,
            s.latency_ms.p95,
            s.latency_ms.max,
            s.tokens.prompt,
            s.tokens.generated,
            escape(&s.started_at)
        );
    }
    if figures.is_empty() {
        return Ok(());
    }
    writeln!(out, "<section class=\"charts\">{figures}</section>")
}

/// The card of one line.
fn card(line: &Value, base: &Path) -> String {
    let failed = outcome(line) != Outcome::Answered;
    let mut html = format!(
        "<article class=\"card{}\">",
        if failed { " failed" } else { "" }
    );
    for image in &images(line) {
        html.push_str(&thumb::tag(&resolve(image, base)));
    }
    html.push_str("<div class=\"body\">");
    if let Some(frame) = line.get("frame_path").and_then(Value::as_str) {
        let when = line["timestamp_s"]
            .as_f64()
            .map_or_else(|| "–".to_string(), timestamp);
        let _ = write!(html, "<div class=\"when\">{when}");
        if let Some(source) = line["source"].as_str() {
            let _ = write!(html, " · {}", escape(source));
        }
        let _ = write!(html, "</div><div class=\"path\">{}</div>", escape(frame));
    } else {
        let _ = write!(
            html,
            "<div class=\"when\">id {}{}</div>",
            escape(&line["id"].to_string()),
            line["source"]
                .as_str()
                .map(|s| format!(" · {}", escape(s)))
                .unwrap_or_default()
        );
    }
    if let Some(error) = line["error"].as_str() {
        let _ = write!(html, "<p class=\"error\">{}</p>", escape(error));
    } else if let Some(scene) = line.get("scene") {
        html.push_str("<dl>");
        for field in ["visual_content", "mood", "action", "setting"] {
            let text = scene[field].as_str().unwrap_or("");
            let _ = write!(
                html,
                "<dt>{}</dt><dd>{}</dd>",
                field.replace('_', " "),
                escape(text)
            );
        }
        html.push_str("</dl>");
    } else if let Some(result) = line.get("result") {
        let pretty = serde_json::to_string_pretty(result).unwrap_or_default();
        let _ = write!(html, "<pre>{}</pre>", escape(&pretty));
    }
    html.push_str("</div></article>\n");
    html
}

/// A frame's path as the run wrote it: as given where it exists (relative to where the run ran),
/// else relative to the results file's folder.
fn resolve(frame: &Path, base: &Path) -> PathBuf {
    if frame.is_absolute() || frame.exists() {
        frame.to_path_buf()
    } else {
        base.join(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_read_as_a_clock_and_text_is_escaped() {
        assert_eq!(timestamp(3723.4567), "01:02:03.457");
        assert_eq!(timestamp(0.0), "00:00:00.000");
        assert_eq!(timestamp(-1.5), "-00:00:01.500");
        assert_eq!(
            escape("<b>\"a\" & 'b'</b>"),
            "&lt;b&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/b&gt;"
        );
    }

    #[test]
    fn each_kind_of_line_gets_its_card() {
        let dir = tempfile::tempdir().unwrap();
        let answered = json!({"frame_path": "gone.jpg", "timestamp_s": 61.5, "source": "cut",
            "scene": {"visual_content": "a <car>", "mood": "tense", "action": "chase", "setting": "night"}});
        let html = card(&answered, dir.path());
        assert!(
            html.contains("00:01:01.500 · cut") && html.contains("a &lt;car&gt;"),
            "{html}"
        );
        assert!(
            html.contains("missing"),
            "a frame not on disk says so: {html}"
        );
        assert!(!html.contains("card failed"));
        let failed =
            json!({"frame_path": "x.jpg", "timestamp_s": null, "error": "x.jpg: not a JPEG"});
        let html = card(&failed, dir.path());
        assert!(
            html.contains("card failed") && html.contains("not a JPEG"),
            "{html}"
        );
        let record = json!({"id": 7, "result": {"climax_t": 81.5}});
        let html = card(&record, dir.path());
        assert!(
            html.contains("id 7") && html.contains("&quot;climax_t&quot;: 81.5"),
            "{html}"
        );
    }

    #[test]
    fn a_shard_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let shard = dir.path().join("scenes.1.jsonl");
        std::fs::write(
            &shard,
            "{\"frame_path\":\"a.jpg\",\"index\":3,\"of\":9,\"error\":\"x\"}\n",
        )
        .unwrap();
        let err = scan(&shard, Path::new("report.html")).unwrap_err();
        assert!(err.contains("merge the shards first"), "{err}");
    }
}
