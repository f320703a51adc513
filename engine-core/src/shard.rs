//! Sharding: which part of an input a run takes, for many hosts sharing one job through an existing
//! scheduler (a Kubernetes Indexed Job, a Slurm job array). Which shard a run is comes from its
//! front end (the CLI's `--shard I/N`, or the scheduler's variables).
//!
//! The split sorts the items by their key (the frame path as written in the output, or the record
//! id) and deals them out in turn, so the same inputs give the same shards on every host whatever the
//! order they were listed in, and no shard is more than one item larger than another.

use std::collections::HashMap;

/// This run's part: shard `index` of `count` (from 0), the index always below the count.
///
/// ```
/// use engine_core::shard::{Shard, positions};
/// let names: Vec<String> = ["c.jpg", "a.jpg", "b.jpg", "d.jpg"].map(String::from).to_vec();
/// // Sorted: a, b, c, d; dealt out in turn: shard 0 takes a and c.
/// assert_eq!(positions(&names, Shard::new(0, 2)?), [0, 1]);
/// assert!(Shard::new(2, 2).is_err() && Shard::new(0, 0).is_err());
/// # Ok::<(), engine_core::shard::ShardError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    index: usize,
    count: usize,
}

/// A shard that cannot be: no shards at all, or an index past the last.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShardError {
    /// The count is zero.
    #[error("shard {index}/0: the count must be at least 1")]
    NoShards {
        /// The index given.
        index: usize,
    },
    /// The index is not below the count.
    #[error("shard {index}/{count}: the index must be below the count (from 0 to {})", count - 1)]
    PastTheLast {
        /// The index given.
        index: usize,
        /// The count given.
        count: usize,
    },
}

impl Shard {
    /// Shard `index` of `count`, from 0.
    pub fn new(index: usize, count: usize) -> Result<Shard, ShardError> {
        if count == 0 {
            return Err(ShardError::NoShards { index });
        }
        if index >= count {
            return Err(ShardError::PastTheLast { index, count });
        }
        Ok(Shard { index, count })
    }

    /// Which part, from 0.
    pub fn index(self) -> usize {
        self.index
    }

    /// How many parts.
    pub fn count(self) -> usize {
        self.count
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
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
            let mine = positions(&keys, Shard::new(index, count).unwrap());
            let theirs: Vec<&String> = positions(&reversed, Shard::new(index, count).unwrap())
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
                .map(|index| positions(&keys, Shard::new(index, count).unwrap()).len())
                .collect();
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= 1, "{count}: {sizes:?}");
        }
    }
}
