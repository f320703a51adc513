//! Sharding (the CLI's `--shard I/N`): which part of an input a run takes, for many hosts sharing
//! one job through an existing scheduler (a Kubernetes Indexed Job, a Slurm job array).
//!
//! The split sorts the items by their key (the frame path as written in the output, or the record
//! id) and deals them out in turn, so the same inputs give the same shards on every host whatever the
//! order they were listed in, and no shard is more than one item larger than another.

use std::collections::HashMap;

/// This run's part: shard `index` of `count` (from 0).
///
/// ```
/// use engine_core::shard::{Shard, positions};
/// let names: Vec<String> = ["c.jpg", "a.jpg", "b.jpg", "d.jpg"].map(String::from).to_vec();
/// // Sorted: a, b, c, d; dealt out in turn: shard 0 takes a and c.
/// assert_eq!(positions(&names, Shard { index: 0, count: 2 }), [0, 1]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which part, from 0.
    pub index: usize,
    /// How many parts.
    pub count: usize,
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
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
    let number = |what: &str, text: &str| {
        text.trim()
            .parse::<usize>()
            .map_err(|_| format!("{what} is {text:?}: expected a whole number"))
    };
    let shard = if let Some(flag) = flag {
        let (i, n) = flag
            .split_once('/')
            .ok_or_else(|| format!("--shard {flag}: expected I/N, such as 0/4"))?;
        Shard {
            index: number("--shard's I", i)?,
            count: number("--shard's N", n)?,
        }
    } else if let Some(index) = env("JOB_COMPLETION_INDEX") {
        let count = shards.ok_or(
            "JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but not the number of shards: \
             pass --shards N (the Job's completions), or --shard I/N",
        )?;
        Shard {
            index: number("JOB_COMPLETION_INDEX", &index)?,
            count,
        }
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
        Shard {
            index: offset / step,
            count: number("SLURM_ARRAY_TASK_COUNT", &count)?,
        }
    } else if shards.is_some() {
        return Err(
            "--shards N needs the shard's index: JOB_COMPLETION_INDEX (Kubernetes), or --shard I/N"
                .into(),
        );
    } else {
        return Ok(None);
    };
    if shard.count == 0 {
        return Err(format!("shard {shard}: the count must be at least 1"));
    }
    if shard.index >= shard.count {
        return Err(format!(
            "shard {shard}: the index must be below the count (from 0 to {})",
            shard.count.saturating_sub(1)
        ));
    }
    if let Some(n) = shards
        && n != shard.count
    {
        return Err(format!(
            "--shards {n} disagrees with the shard count {} from {}",
            shard.count,
            if flag.is_some() {
                "--shard"
            } else {
                "the environment"
            }
        ));
    }
    Ok(Some(shard))
}

/// Which positions of `keys` (one per input item, in input order) belong to `shard`, in input order.
/// Equal keys are dealt out by their input order among themselves.
pub fn positions(keys: &[String], shard: Shard) -> Vec<usize> {
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by(|&a, &b| keys[a].cmp(&keys[b]).then(a.cmp(&b)));
    let rank: HashMap<usize, usize> = order.iter().enumerate().map(|(r, &i)| (i, r)).collect();
    (0..keys.len())
        .filter(|i| rank[i] % shard.count == shard.index)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Ok(Some(Shard { index: 2, count: 4 }))
        );
        let k8s = env(&[("JOB_COMPLETION_INDEX", "3")]);
        assert_eq!(
            choose(None, Some(8), &k8s),
            Ok(Some(Shard { index: 3, count: 8 }))
        );
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
        ]);
        assert_eq!(
            choose(None, None, &slurm),
            Ok(Some(Shard { index: 2, count: 4 }))
        );
        // --array=0-4:2: ids 0, 2, 4 are shards 0, 1, 2 of 3.
        let stepped = env(&[
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ]);
        assert_eq!(
            choose(None, None, &stepped),
            Ok(Some(Shard { index: 2, count: 3 }))
        );
        // The flag wins over the environment.
        assert_eq!(
            choose(Some("0/2"), None, &slurm),
            Ok(Some(Shard { index: 0, count: 2 }))
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

    #[test]
    fn shards_cover_every_item_once_whatever_the_listing_order() {
        let keys: Vec<String> = (0..103)
            .map(|i| format!("kf/frame_{:010}.jpg", i * 7919 % 1000))
            .collect();
        let mut reversed = keys.clone();
        reversed.reverse();
        let count = 4;
        let mut seen = vec![0; keys.len()];
        for index in 0..count {
            let mine = positions(&keys, Shard { index, count });
            let theirs: Vec<&String> = positions(&reversed, Shard { index, count })
                .into_iter()
                .map(|i| &reversed[i])
                .collect();
            let mut a: Vec<&String> = mine.iter().map(|&i| &keys[i]).collect();
            let mut b = theirs;
            a.sort();
            b.sort();
            assert_eq!(a, b, "shard {index} holds the same items in any order");
            for i in mine {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
    }

    #[test]
    fn ten_thousand_names_are_balanced_within_one_item() {
        let keys: Vec<String> = (0..10_000)
            .map(|i| format!("frame_{:010}.jpg", i * 40))
            .collect();
        for count in [3, 7, 16, 64] {
            let sizes: Vec<usize> = (0..count)
                .map(|index| positions(&keys, Shard { index, count }).len())
                .collect();
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= 1, "{count}: {sizes:?}");
        }
    }
}
