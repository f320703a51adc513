//! `--slots auto`: each GPU's slot count from the model's own numbers and that GPU's free VRAM
//! (engine-core's [`EngineConfig::auto_slots`]), decided before the servers start and said on
//! stderr with the numbers behind it.

use std::sync::atomic::AtomicBool;

use engine_core::gpu::{Visible, select};
use engine_core::{EngineConfig, Wait};

use crate::settings::say;

/// `configs`, each with the slots its GPU's free VRAM holds; one reading serves them all. A GPU whose
/// memory cannot be read keeps its configuration: its start says why (and `--gpus all` leaves it
/// out, as without `auto`).
pub fn resolve(configs: Vec<EngineConfig>, stop: &AtomicBool) -> Result<Vec<EngineConfig>, String> {
    let Some(first) = configs.first() else {
        return Ok(configs);
    };
    let rows = first
        .vram_probe()
        .and_then(|probe| probe.query(Wait::Until(stop)))
        .map_err(say)?;
    let visible = Visible::from_env();
    configs
        .into_iter()
        .map(|config| {
            let Ok(reading) = select(&rows, config.gpu(), &visible, 0) else {
                return Ok(config);
            };
            let choice = config.auto_slots(reading.free_mib).map_err(say)?;
            eprintln!(
                "cinecut-infer: --slots auto: GPU {}: {} slots — {}",
                reading.gpu, choice.slots, choice.why
            );
            config.to_builder().slots(choice.slots).build().map_err(say)
        })
        .collect()
}
