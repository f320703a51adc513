//! `cinecut-infer check`: every GPU's free memory, and the engine's own verdict for the chosen one.

use engine_core::Wait;
use engine_core::gpu::{Visible, VramProbe, select};

use crate::cli::CheckArgs;
use crate::exit::{Exit, Failure, Outcome};
use crate::settings::say;

/// Exit 3 (the GPU cannot take the engine) when VRAM cannot be read or the chosen GPU has too
/// little of it.
pub fn check(args: CheckArgs) -> Outcome {
    let CheckArgs {
        gpu,
        vram_probe,
        min_vram: min_mib,
    } = args;
    let queried = VramProbe::from_env(vram_probe).and_then(|probe| probe.query(Wait::Forever));
    let rows = queried.map_err(|e| Failure {
        exit: Exit::GpuUnusable,
        message: format!("cannot read VRAM: {}", say(e)),
    })?;
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
        Ok(_) => Ok(Exit::Done),
        Err(e) => Err(Failure {
            exit: Exit::GpuUnusable,
            message: say(e),
        }),
    }
}
