//! The choice of GPU: [`select`], one pure decision over a probe's rows that honours
//! `CUDA_VISIBLE_DEVICES`, and [`distinct`], which finds a GPU named twice.

use super::error::VramError;
use super::id::{GpuId, GpuRow, Visible, VramReading, named};

/// Chooses GPU `gpu` among nvidia-smi's `rows` as this process may see them (`visible`), and checks
/// that it has at least `min_mib` free. The engine and every front end's check decide with it.
///
/// ```
/// use engine_core::gpu::{GpuRow, Visible, select};
/// use engine_core::GpuId;
/// let rows = vec![
///     GpuRow { index: 0, uuid: "GPU-a".into(), free_mib: Ok(500) },
///     GpuRow { index: 1, uuid: "GPU-b".into(), free_mib: Ok(70000) },
/// ];
/// assert_eq!(select(&rows, &GpuId::Index(1), &Visible::All, 6144).unwrap().uuid, "GPU-b");
/// // A scheduler gave this process GPU 1 only: index 0 is that GPU.
/// let given = Visible::parse(Some("1"));
/// assert_eq!(select(&rows, &GpuId::Index(0), &given, 6144).unwrap().gpu, 1);
/// assert!(select(&rows, &GpuId::Index(0), &Visible::All, 6144).is_err()); // only 500 MiB free
/// ```
pub fn select(
    rows: &[GpuRow],
    gpu: &GpuId,
    visible: &Visible,
    min_mib: u64,
) -> Result<VramReading, VramError> {
    let row = find(rows, gpu, visible)?;
    let free_mib = row
        .free_mib
        .clone()
        .map_err(|reason| VramError::Unreadable {
            gpu: row.index,
            reason,
        })?;
    if free_mib < min_mib {
        return Err(VramError::Insufficient {
            gpu: row.index,
            free_mib,
            min_mib,
        });
    }
    Ok(VramReading {
        gpu: row.index,
        uuid: row.uuid.clone(),
        free_mib,
    })
}

fn find<'a>(rows: &'a [GpuRow], gpu: &GpuId, visible: &Visible) -> Result<&'a GpuRow, VramError> {
    let no_such = || VramError::NoSuchGpu {
        gpu: gpu.clone(),
        count: rows.len(),
        visible: visible.clone(),
    };
    let usable = visible.rows(rows);
    match gpu {
        // Without CUDA_VISIBLE_DEVICES an index is nvidia-smi's; with it, a position in its list.
        GpuId::Index(i) => match visible {
            Visible::All => rows.iter().find(|r| r.index == *i),
            Visible::Listed(_) => usable.get(*i as usize).copied(),
        },
        GpuId::Uuid(uuid) => {
            named(uuid, rows).filter(|row| usable.iter().any(|u| u.index == row.index))
        }
    }
    .ok_or_else(no_such)
}

/// A GPU named twice in one list (by its index and by its UUID, say): the first name and the second.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("GPU {index} is named twice ({first} and {second}): name each GPU once")]
pub struct NamedTwice {
    /// The GPU's nvidia-smi index.
    pub index: u32,
    /// How it was named first.
    pub first: GpuId,
    /// How it was named again.
    pub second: GpuId,
}

/// What [`distinct`] makes of a list of GPUs: each name's position in the list, with its reading
/// (or why it names no GPU), for the first name of each GPU; and the names that repeat one.
pub type Distinct = (
    Vec<(usize, Result<VramReading, VramError>)>,
    Vec<(usize, NamedTwice)>,
);

/// Resolves each of `gpus` to its row (as [`select`] does, without a minimum), in order, and sets
/// apart every name of a GPU already named: an engine per GPU would otherwise wait for its own
/// lock. The pool leaves those out; a front end that takes a list refuses them.
///
/// ```
/// use engine_core::gpu::{GpuRow, Visible, distinct};
/// use engine_core::GpuId;
/// let rows = vec![GpuRow { index: 0, uuid: "GPU-a".into(), free_mib: Ok(1) }];
/// let twice = [GpuId::Index(0), GpuId::Uuid("GPU-a".into())];
/// let (first, again) = distinct(&rows, &twice, &Visible::All);
/// assert_eq!(first.len(), 1);
/// assert_eq!((again[0].0, again[0].1.index), (1, 0));
/// ```
pub fn distinct(rows: &[GpuRow], gpus: &[GpuId], visible: &Visible) -> Distinct {
    let mut first: Vec<(usize, Result<VramReading, VramError>)> = Vec::new();
    let mut again = Vec::new();
    for (position, gpu) in gpus.iter().enumerate() {
        let reading = select(rows, gpu, visible, 0);
        let earlier = reading.as_ref().ok().and_then(|r| {
            first
                .iter()
                .find(|(_, seen)| seen.as_ref().is_ok_and(|s| s.gpu == r.gpu))
        });
        match (earlier, &reading) {
            (Some((at, _)), Ok(r)) => again.push((
                position,
                NamedTwice {
                    index: r.gpu,
                    first: gpus[*at].clone(),
                    second: gpu.clone(),
                },
            )),
            _ => first.push((position, reading)),
        }
    }
    (first, again)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A reading of GPU `index` with `free` MiB free (the probe's tests use it too).
    pub(crate) fn row(index: u32, uuid: &str, free: u64) -> GpuRow {
        GpuRow {
            index,
            uuid: uuid.into(),
            free_mib: Ok(free),
        }
    }

    #[test]
    fn visible_devices_choose_and_renumber_the_gpus() {
        let rows = vec![
            row(0, "GPU-aa", 1),
            row(1, "GPU-bb", 2),
            row(2, "GPU-cc", 3),
        ];
        let pick = |gpu: GpuId, visible: Option<&str>| {
            select(&rows, &gpu, &Visible::parse(visible), 0).map(|r| r.gpu)
        };
        assert_eq!(pick(GpuId::Index(2), None).unwrap(), 2);
        assert_eq!(pick(GpuId::Uuid("GPU-bb".into()), None).unwrap(), 1);
        assert_eq!(pick(GpuId::Index(0), Some("2,0")).unwrap(), 2);
        assert_eq!(pick(GpuId::Index(1), Some("2,0")).unwrap(), 0);
        assert_eq!(pick(GpuId::Index(0), Some("GPU-b")).unwrap(), 1);
        assert_eq!(pick(GpuId::Uuid("GPU-cc".into()), Some("2")).unwrap(), 2);
        for (gpu, visible) in [
            (GpuId::Index(3), None),
            (GpuId::Index(1), Some("2")),
            (GpuId::Index(0), Some("")),
            (GpuId::Index(0), Some("-1")),
            (GpuId::Index(0), Some("7")),
            // CUDA stops at the first entry that names no GPU: 0 is not visible after 7.
            (GpuId::Index(1), Some("7,0")),
            (GpuId::Uuid("GPU-aa".into()), Some("2")),
            (GpuId::Uuid("GPU-zz".into()), None),
            // A prefix two GPUs share names neither.
            (GpuId::Uuid("GPU-".into()), None),
            (GpuId::Index(0), Some("GPU-")),
        ] {
            let err = pick(gpu.clone(), visible).unwrap_err();
            assert!(
                matches!(err, VramError::NoSuchGpu { .. }),
                "{gpu} {visible:?}: {err}"
            );
            assert!(
                err.to_string().contains(&format!("{gpu} not found")),
                "{err}"
            );
        }
        let hidden = select(&rows, &GpuId::Index(0), &Visible::parse(Some("-1")), 0).unwrap_err();
        assert!(hidden.to_string().contains("hides them all"), "{hidden}");
    }

    #[test]
    fn too_little_vram_names_the_reading_and_the_minimum() {
        let err = select(
            &[row(0, "GPU-a", 4000)],
            &GpuId::Index(0),
            &Visible::All,
            6144,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("Only 4000 MiB free VRAM, need at least 6144 MiB"),
            "{err}"
        );
    }
}
