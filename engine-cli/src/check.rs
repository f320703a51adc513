//! `cinecut-infer check`: every GPU's free memory, and the engine's own verdict for the chosen one.

use std::process::ExitCode;

use engine_core::GpuId;
use engine_core::vram::{ProbeChoice, Visible, VramProbe, select};

use crate::summary::EXIT_FRAMES_FAILED;

pub fn check(gpu: &GpuId, min_mib: u64, choice: ProbeChoice) -> ExitCode {
    let rows = match VramProbe::from_env(choice).and_then(|probe| probe.query()) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("cinecut-infer: cannot read VRAM: {e}");
            return ExitCode::from(EXIT_FRAMES_FAILED);
        }
    };
    let visible = Visible::from_env();
    let chosen = select(&rows, gpu, &visible, min_mib);
    let usable: Vec<u32> = visible.rows(&rows).iter().map(|r| r.index).collect();
    for row in &rows {
        if !usable.contains(&row.index) {
            println!(
                "GPU {} {}: not visible to this process ({visible})",
                row.index, row.uuid
            );
            continue;
        }
        let mark = match &chosen {
            Ok(reading) if reading.gpu == row.index => " (chosen)",
            Err(engine_core::VramError::Insufficient { gpu, .. }) if *gpu == row.index => {
                " (chosen)"
            }
            _ => "",
        };
        match &row.free_mib {
            Ok(free) => {
                let verdict = if *free >= min_mib {
                    "would start"
                } else {
                    "too little free VRAM"
                };
                println!(
                    "GPU {} {}{mark}: {free} MiB free, {min_mib} MiB required: {verdict}",
                    row.index, row.uuid
                );
            }
            Err(reason) => println!(
                "GPU {} {}{mark}: cannot read free VRAM: {reason}",
                row.index, row.uuid
            ),
        }
    }
    if let Visible::Listed(_) = visible {
        println!("this process may use {visible}");
    }
    match chosen {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cinecut-infer: {e}");
            ExitCode::from(EXIT_FRAMES_FAILED)
        }
    }
}
