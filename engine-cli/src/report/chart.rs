//! The report's two charts, drawn as inline SVG from the lines' `--timings`: answers per second over
//! the run, and how long answers took.

use std::fmt::Write as _;

const W: f64 = 360.0;
const H: f64 = 120.0;
const BARS: usize = 24;

/// Bars of `values` counted into `BARS` equal bins over `0..=max`; with the axis labels.
fn bars(counts: &[f64], caption: &str, left: &str, right: &str, top: &str) -> String {
    let highest = counts.iter().copied().fold(0.0, f64::max).max(1e-9);
    let width = W / counts.len() as f64;
    let mut svg = format!(
        "<figure><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" \
         viewBox=\"0 0 {W} {}\" role=\"img\" aria-label=\"{caption}\">",
        H + 16.0,
        H + 16.0
    );
    for (i, count) in counts.iter().enumerate() {
        let h = count / highest * (H - 14.0);
        let _ = write!(
            svg,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#3b6ea8\"/>",
            i as f64 * width + 1.0,
            H - h,
            (width - 2.0).max(1.0),
            h
        );
    }
    let _ = write!(
        svg,
        "<line x1=\"0\" y1=\"{H}\" x2=\"{W}\" y2=\"{H}\" stroke=\"#999\"/>\
         <text x=\"0\" y=\"{}\" font-size=\"10\">{left}</text>\
         <text x=\"{W}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\">{right}</text>\
         <text x=\"0\" y=\"10\" font-size=\"10\">{top}</text></svg>\
         <figcaption>{caption}</figcaption></figure>",
        H + 12.0,
        H + 12.0
    );
    svg
}

/// How many of `values` fall in each of `BARS` bins over `0..=max`, and that max.
fn histogram(values: &[f64]) -> (Vec<f64>, f64) {
    let max = values.iter().copied().fold(0.0, f64::max).max(1e-9);
    let mut counts = vec![0.0; BARS];
    for v in values {
        let bin = ((v / max) * BARS as f64).floor() as usize;
        counts[bin.min(BARS - 1)] += 1.0;
    }
    (counts, max)
}

/// Answers per second over the run, from when each answer ended (seconds from the run's start).
pub fn throughput(finished_s: &[f64]) -> String {
    let (counts, max) = histogram(finished_s);
    let seconds_per_bar = max / BARS as f64;
    let rates: Vec<f64> = counts.iter().map(|c| c / seconds_per_bar).collect();
    let peak = rates.iter().copied().fold(0.0, f64::max);
    bars(
        &rates,
        "answers per second over the run",
        "0 s",
        &format!("{max:.1} s"),
        &format!("{peak:.1}/s"),
    )
}

/// How long answers took (first attempt to answer), as a histogram.
pub fn latency(latencies_ms: &[f64]) -> String {
    let (counts, max) = histogram(latencies_ms);
    let most = counts.iter().copied().fold(0.0, f64::max);
    bars(
        &counts,
        "latency of the answers",
        "0 ms",
        &format!("{max:.0} ms"),
        &format!("{most:.0} answers"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_a_bin() {
        let (counts, max) = histogram(&[0.0, 1.0, 2.0, 2.0]);
        assert_eq!(max, 2.0);
        assert_eq!(counts.iter().sum::<f64>(), 4.0);
        assert_eq!(counts[BARS - 1], 2.0);
        assert!(throughput(&[0.5, 1.0]).starts_with("<figure><svg"));
    }
}
