//! `cinecut-infer check`: every GPU's free memory, and the engine's own verdict for the chosen one.

use std::process::ExitCode;

use engine_core::Wait;
use engine_core::gpu::{Visible, VramProbe, select};

use crate::cli::CheckArgs;
use crate::job::summary::EXIT_FRAMES_FAILED;
use crate::settings::say;

pub fn check(args: CheckArgs) -> ExitCode {
    let CheckArgs {
        gpu,
        vram_probe,
        min_vram: min_mib,
    } = args;
    let queried = VramProbe::from_env(vram_probe).and_then(|probe| probe.query(Wait::Forever));
    let rows = match queried {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("cinecut-infer: cannot read VRAM: {}", say(e));
            return ExitCode::from(EXIT_FRAMES_FAILED);
        }
    };
    let visible = Visible::from_env();
    let chosen = select(&rows, &gpu, &visible, min_mib);
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
            eprintln!("cinecut-infer: {}", say(e));
            ExitCode::from(EXIT_FRAMES_FAILED)
        }
    }
}
