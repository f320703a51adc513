//! The VRAM pre-check against the nvidia-smi shim: every nvidia-smi failure of docs/design.md §3. A failed
//! check starts no server and takes no lock; the shim never outlives the check.

use std::time::{Duration, Instant};

use engine_core::gpu::{NvidiaSmi, VramProbe};
use engine_core::process::ChildExit;
use engine_core::{Engine, GpuId, VramError, Wait, check_vram_free_mib};
use tests::Harness;

fn probe(program: std::path::PathBuf) -> VramProbe {
    NvidiaSmi::new(program, NvidiaSmi::DEFAULT_TIMEOUT).into()
}

fn check(h: &Harness, knobs: &[(&str, &str)]) -> Result<u64, VramError> {
    let log = h.shim_log();
    let mut all: Vec<(&str, &str)> = knobs.to_vec();
    all.push(("NVSMI_LOG", log.to_str().unwrap()));
    check_vram_free_mib(&probe(h.shim(&all)), 0)
}

/// A knob that makes GPU 0's reading (or the whole answer) unreadable gives `Unreadable` (that
/// GPU's value) or `Unparsable` (the whole answer), naming it.
fn unparsable(h: &Harness, knob: (&str, &str), needle: &str) {
    let err = check(h, &[knob]).unwrap_err();
    assert!(
        matches!(
            err,
            VramError::Unparsable { .. } | VramError::Unreadable { gpu: 0, .. }
        ),
        "{knob:?}: {err:?}"
    );
    assert!(err.to_string().contains(needle), "{knob:?}: {err}");
    h.assert_clean();
}

#[test]
fn a_plain_reading_is_returned() {
    let h = Harness::new();
    assert_eq!(check(&h, &[("NVSMI_GPUS", "24564")]).unwrap(), 24564);
    // The engine asked for the seed's memory.free, with each GPU's index and UUID.
    let log = std::fs::read_to_string(h.shim_log()).unwrap();
    assert!(
        log.contains(" --query-gpu=index,uuid,memory.free --format=csv,noheader,nounits"),
        "{log}"
    );
    h.assert_clean();
}

#[test]
fn the_configured_gpu_is_selected_from_several_lines() {
    let h = Harness::new();
    let smi = probe(h.shim(&[("NVSMI_GPUS", "1000,2000,3000")]));
    assert_eq!(check_vram_free_mib(&smi, 0).unwrap(), 1000);
    assert_eq!(check_vram_free_mib(&smi, 2).unwrap(), 3000);
    let uuid: GpuId = tests::shim_uuid(1).parse().unwrap();
    assert_eq!(check_vram_free_mib(&smi, uuid).unwrap(), 2000);
    let err = check_vram_free_mib(&smi, 3).unwrap_err();
    assert!(
        matches!(err, VramError::NoSuchGpu { count: 3, .. }),
        "{err:?}"
    );
    assert!(err.to_string().starts_with("GPU 3 not found"), "{err}");
    h.assert_clean();
}

#[test]
fn a_bad_line_on_another_gpu_does_not_matter() {
    let h = Harness::new();
    assert_eq!(check(&h, &[("NVSMI_GPUS", "5000,[N/A]")]).unwrap(), 5000);
}

#[test]
fn not_installed() {
    let h = Harness::new();
    let err = check_vram_free_mib(&probe(h.dir.path().join("no-nvidia-smi")), 0).unwrap_err();
    assert!(matches!(err, VramError::NotInstalled { .. }));
    assert!(err.to_string().contains("`nvidia_smi`"), "{err}");
}

#[test]
fn driver_failure_exit_9_carries_the_message() {
    let h = Harness::new();
    let err = check(&h, &[("NVSMI_EXIT", "9")]).unwrap_err();
    match &err {
        VramError::Failed {
            status, message, ..
        } => {
            assert_eq!(*status, ChildExit::Code(9));
            assert!(message.contains("couldn't communicate with the NVIDIA driver"));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("failed with exit code 9"), "{err}");
    h.assert_clean();
}

#[test]
fn each_unparsable_output_names_its_problem() {
    let h = Harness::new();
    unparsable(&h, ("NVSMI_GPUS", "[N/A]"), "[N/A]");
    unparsable(
        &h,
        ("NVSMI_GPUS", "[Insufficient Permissions]"),
        "Insufficient Permissions",
    );
    unparsable(&h, ("NVSMI_OUTPUT", ""), "no GPU line");
    unparsable(&h, ("NVSMI_OUTPUT", "   \n  \n"), "no GPU line");
    unparsable(
        &h,
        ("NVSMI_GPUS", "99999999999999999999999999"),
        "larger than any GPU",
    );
    unparsable(&h, ("NVSMI_GPUS", "-2048"), "negative");
    unparsable(
        &h,
        ("NVSMI_OUTPUT", "Segmentation fault\n"),
        "is not `index, uuid, memory.free`",
    );
}

#[test]
fn a_hung_nvidia_smi_is_killed_and_reaped() {
    let h = Harness::new();
    let log = h.shim_log();
    let shim = h.shim(&[("NVSMI_HANG", "1"), ("NVSMI_LOG", log.to_str().unwrap())]);
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = check_vram_free_mib(&NvidiaSmi::new(shim, timeout).into(), 0).unwrap_err();
    assert!(matches!(err, VramError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() >= timeout);
    assert_eq!(h.shim_pids().len(), 1, "the shim ran once");
    h.assert_clean();
}

#[test]
fn too_little_vram_stops_before_the_lock_and_the_server() {
    let h = Harness::new();
    let config = h
        .config()
        .nvidia_smi(h.shim(&[("NVSMI_GPUS", "4000")]))
        .min_vram_mib(6144);
    let err = Engine::new(config.build().unwrap())
        .check_vram(Wait::Forever)
        .unwrap_err();
    assert_eq!(
        err.to_string().split(" (GPU").next().unwrap(),
        "Only 4000 MiB free VRAM, need at least 6144 MiB"
    );
    assert!(h.spawned_pids().is_empty());
    h.assert_clean();
}
