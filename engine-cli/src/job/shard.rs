//! Which shard of a many-host job this run is (`--shard I/N`, or the scheduler's variables), and
//! the items that are this shard's, each told its place in the whole input.

use std::collections::HashSet;
use std::sync::Arc;

use engine_core::shard::{Shard, positions};

use super::plan::{Item, Place};

/// A number from a flag or a variable: a whole number that fits, or an error that says which.
fn number(what: &str, text: &str) -> Result<usize, String> {
    let text = text.trim();
    match text.parse::<usize>() {
        Ok(n) => Ok(n),
        Err(_) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => Err(format!(
            "{what} is {text}: too large (at most {})",
            usize::MAX
        )),
        Err(_) => Err(format!("{what} is {text:?}: expected a whole number")),
    }
}

/// The shard from `--shard I/N`, else from the scheduler's environment (`env`): `JOB_COMPLETION_INDEX`
/// with `--shards N` (Kubernetes), or `SLURM_ARRAY_TASK_ID` with `SLURM_ARRAY_TASK_COUNT` (and
/// `SLURM_ARRAY_TASK_MIN`, the first id). `None`: the whole input.
pub fn choose(
    flag: Option<&str>,
    shards: Option<usize>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Shard>, String> {
    if shards == Some(0) {
        return Err("--shards 0: the number of shards must be at least 1".into());
    }
    let (index, count) = if let Some(flag) = flag {
        let (i, n) = flag
            .split_once('/')
            .ok_or_else(|| format!("--shard {flag}: expected I/N, such as 0/4"))?;
        (number("--shard's I", i)?, number("--shard's N", n)?)
    } else if let Some(index) = env("JOB_COMPLETION_INDEX") {
        let count = shards.ok_or(
            "JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but not the number of shards: \
             pass --shards N (the Job's completions), or --shard I/N",
        )?;
        (number("JOB_COMPLETION_INDEX", &index)?, count)
    } else if let Some(id) = env("SLURM_ARRAY_TASK_ID") {
        let count = env("SLURM_ARRAY_TASK_COUNT")
            .ok_or("SLURM_ARRAY_TASK_ID is set but not SLURM_ARRAY_TASK_COUNT: pass --shard I/N")?;
        let first = env("SLURM_ARRAY_TASK_MIN").unwrap_or_else(|| "0".into());
        let step = env("SLURM_ARRAY_TASK_STEP").unwrap_or_else(|| "1".into());
        let (id, first, step) = (
            number("SLURM_ARRAY_TASK_ID", &id)?,
            number("SLURM_ARRAY_TASK_MIN", &first)?,
            number("SLURM_ARRAY_TASK_STEP", &step)?.max(1),
        );
        // --array=0-8:2 runs ids 0, 2, 4, 6, 8: shards 0 to 4.
        let offset = id.checked_sub(first).ok_or(format!(
            "SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {first}"
        ))?;
        if offset % step != 0 {
            return Err(format!(
                "SLURM_ARRAY_TASK_ID {id} is not on the array's step {step} from {first}: \
                 pass --shard I/N"
            ));
        }
        (offset / step, number("SLURM_ARRAY_TASK_COUNT", &count)?)
    } else if shards.is_some() {
        return Err(
            "--shards N needs the shard's index: JOB_COMPLETION_INDEX (Kubernetes), or --shard I/N"
                .into(),
        );
    } else {
        return Ok(None);
    };
    let shard = Shard::new(index, count).map_err(|e| e.to_string())?;
    if let Some(n) = shards
        && n != shard.count()
    {
        return Err(format!(
            "--shards {n} disagrees with the shard count {} from {}",
            shard.count(),
            if flag.is_some() {
                "--shard"
            } else {
                "the environment"
            }
        ));
    }
    Ok(Some(shard))
}

/// The items of this run's shard (`--shard`, or the scheduler's environment), each told its place
/// in the whole input; all of them when there is no shard.
pub fn take(
    items: Vec<Item>,
    flag: Option<&str>,
    shards: Option<usize>,
) -> Result<Vec<Item>, String> {
    let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
    let Some(shard) = choose(flag, shards, &env)? else {
        return Ok(items);
    };
    let total = items.len();
    let keys: Vec<String> = items.iter().map(Item::shard_key).collect();
    let job: Arc<str> = job_name(&keys).into();
    let mine: HashSet<usize> = positions(&keys, shard).into_iter().collect();
    let items: Vec<Item> = items
        .into_iter()
        .enumerate()
        .filter(|(i, _)| mine.contains(i))
        .map(|(i, mut item)| {
            item.position = Some(Place {
                index: i,
                of: total,
                job: job.clone(),
            });
            item
        })
        .collect();
    eprintln!(
        "cinecut-infer: shard {shard}: {} of {total} items",
        items.len()
    );
    Ok(items)
}

/// A name for the whole input of a sharded job: FNV-1a over its sorted keys, so every host of the
/// job computes the same one whatever its listing order.
fn job_name(keys: &[String]) -> String {
    let mut sorted: Vec<&String> = keys.iter().collect();
    sorted.sort();
    let hash = sorted.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, key| {
        key.bytes()
            .chain(std::iter::once(b'\n'))
            .fold(h, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    });
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |key| vars.get(key).cloned()
    }

    #[test]
    fn the_shard_comes_from_the_flag_or_the_scheduler() {
        let none = env(&[]);
        assert_eq!(choose(None, None, &none), Ok(None));
        assert_eq!(
            choose(Some("2/4"), None, &none),
            Ok(Some(Shard::new(2, 4).unwrap()))
        );
        let k8s = env(&[("JOB_COMPLETION_INDEX", "3")]);
        assert_eq!(
            choose(None, Some(8), &k8s),
            Ok(Some(Shard::new(3, 8).unwrap()))
        );
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
        ]);
        assert_eq!(
            choose(None, None, &slurm),
            Ok(Some(Shard::new(2, 4).unwrap()))
        );
        // --array=0-4:2: ids 0, 2, 4 are shards 0, 1, 2 of 3.
        let stepped = env(&[
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ]);
        assert_eq!(
            choose(None, None, &stepped),
            Ok(Some(Shard::new(2, 3).unwrap()))
        );
        // The flag wins over the environment.
        assert_eq!(
            choose(Some("0/2"), None, &slurm),
            Ok(Some(Shard::new(0, 2).unwrap()))
        );
    }

    #[test]
    fn each_bad_shard_is_named() {
        let none = env(&[]);
        for (flag, shards, needle) in [
            (Some("4/4"), None, "below the count"),
            (Some("1/0"), None, "at least 1"),
            (Some("x/2"), None, "whole number"),
            (Some("1"), None, "expected I/N"),
            (Some("1/4"), Some(3), "disagrees"),
            (None, Some(3), "needs the shard's index"),
            (
                None,
                Some(0),
                "--shards 0: the number of shards must be at least 1",
            ),
            (Some("0/0"), Some(0), "at least 1"),
            (Some("0/18446744073709551616"), None, "too large"),
            (Some("-1/4"), None, "expected a whole number"),
        ] {
            let err = choose(flag, shards, &none).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
        let k8s = env(&[("JOB_COMPLETION_INDEX", "1")]);
        assert!(choose(None, None, &k8s).unwrap_err().contains("--shards N"));
        let slurm = env(&[("SLURM_ARRAY_TASK_ID", "1")]);
        assert!(
            choose(None, None, &slurm)
                .unwrap_err()
                .contains("SLURM_ARRAY_TASK_COUNT")
        );
    }
}
