//! The writer's guard that each durable bucket's log on disk is an unbroken chain.
//!
//! An actor numbers its records 1, 2, 3, … and queues them without waiting. When a
//! commit fails, records of the same bucket may already be queued behind it, and they
//! were made from an in-memory state that includes the refused records (a TAKE's answer
//! holds the aggregate, a snapshot holds the whole state). Committing them would store a
//! window or a state that was never acknowledged, or answer a barrier as if every
//! earlier record were on disk. So the writer admits an op only if it continues what is
//! on disk for its bucket:
//!
//! - an append of record `lsn` needs `lsn = last + 1`;
//! - a snapshot after record `lsn`, and a barrier that expects record `lsn` on disk,
//!   need `lsn <= last`.
//!
//! `last` is what the writer committed for the bucket; a bucket it has not seen yet
//! starts its chain at its first op (the actor loaded it from disk). After a failure,
//! the bucket reloads from disk and numbers on from there, which joins the chain again.

use std::collections::HashMap;

/// Where an op sits in its bucket's chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Link {
    /// Appends record `lsn`.
    Append { uid: u64, lsn: u64 },
    /// Needs record `lsn` to be the last one on disk (a snapshot or a barrier).
    At { uid: u64, lsn: u64 },
    /// Removes the bucket.
    Forget { uid: u64 },
}

/// The last committed lsn of every durable bucket the writer has seen.
#[derive(Debug, Default)]
pub(super) struct Chains {
    last: HashMap<u64, u64>,
}

/// The links admitted into one batch, not yet committed.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// uid → the lsn the chain reaches if the batch commits.
    reached: HashMap<u64, u64>,
    /// uid → where a chain seen for the first time starts, kept even if the commit
    /// fails (what the failed ops meant to follow is on disk).
    started: HashMap<u64, u64>,
    forgotten: Vec<u64>,
}

impl Chains {
    /// Admits `link` into `batch`, or says which lsn it should have continued from.
    pub fn admit(&self, batch: &mut Batch, link: Link) -> Result<(), u64> {
        let (uid, lsn, append) = match link {
            Link::Forget { uid } => {
                batch.forgotten.push(uid);
                batch.reached.remove(&uid);
                return Ok(());
            }
            Link::Append { uid, lsn } => (uid, lsn, true),
            Link::At { uid, lsn } => (uid, lsn, false),
        };
        let last = match batch.reached.get(&uid).or(self.last.get(&uid)) {
            Some(&last) => last,
            None => {
                let start = if append { lsn.wrapping_sub(1) } else { lsn };
                batch.started.insert(uid, start);
                start
            }
        };
        // A snapshot or barrier at an earlier record is fine: that record is on disk.
        let follows = if append {
            lsn == last.wrapping_add(1)
        } else {
            lsn <= last
        };
        if !follows {
            return Err(last);
        }
        batch.reached.insert(uid, last.max(lsn));
        Ok(())
    }

    /// The batch committed (`true`) or failed.
    pub fn settle(&mut self, batch: Batch, committed: bool) {
        if committed {
            self.last.extend(batch.reached);
            for uid in batch.forgotten {
                self.last.remove(&uid);
            }
        } else {
            for (uid, base) in batch.started {
                self.last.entry(uid).or_insert(base);
            }
        }
    }

    /// The buckets whose chains are known.
    pub fn uids(&self) -> Vec<u64> {
        self.last.keys().copied().collect()
    }

    /// Sets a chain's end to what is on disk (after the database was opened again). When
    /// that cannot be read (`None`) the end stays: forgetting it would let the next op,
    /// stale or not, start a new chain.
    pub fn resync(&mut self, uid: u64, on_disk: Option<u64>) {
        if let Some(lsn) = on_disk {
            self.last.insert(uid, lsn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(chains: &Chains, links: &[Link]) -> (Batch, Vec<Result<(), u64>>) {
        let mut b = Batch::default();
        let verdicts = links.iter().map(|&l| chains.admit(&mut b, l)).collect();
        (b, verdicts)
    }

    const fn append(lsn: u64) -> Link {
        Link::Append { uid: 7, lsn }
    }

    const fn at(lsn: u64) -> Link {
        Link::At { uid: 7, lsn }
    }

    #[test]
    fn a_chain_starts_at_its_first_op_and_continues() {
        let mut chains = Chains::default();
        let (b, v) = batch(&chains, &[append(5), append(6), at(6), at(5)]);
        assert_eq!(v, [Ok(()), Ok(()), Ok(()), Ok(())]);
        chains.settle(b, true);
        let (b, v) = batch(&chains, &[append(7), append(9), at(8), at(7)]);
        assert_eq!(v, [Ok(()), Err(7), Err(7), Ok(())]);
        chains.settle(b, true);
        assert_eq!(chains.last.get(&7), Some(&7));
    }

    #[test]
    fn ops_behind_a_failed_commit_are_refused_until_the_bucket_reloads() {
        let mut chains = Chains::default();
        let (b, _) = batch(&chains, &[append(1), append(2)]);
        chains.settle(b, true);
        // Records 3 and 4 fail; what the actor queued behind them does not follow 2.
        let (b, v) = batch(&chains, &[append(3), append(4)]);
        assert_eq!(v, [Ok(()), Ok(())]);
        chains.settle(b, false);
        let (_, v) = batch(&chains, &[append(5), at(5), at(4)]);
        assert_eq!(v, [Err(2), Err(2), Err(2)]);
        // Reloaded from disk (record 2), the actor numbers on from there.
        let (_, v) = batch(&chains, &[at(2), append(3)]);
        assert_eq!(v, [Ok(()), Ok(())]);
    }

    #[test]
    fn a_first_op_that_fails_still_anchors_the_chain() {
        let mut chains = Chains::default();
        let (b, _) = batch(&chains, &[append(10)]);
        chains.settle(b, false);
        let (_, v) = batch(&chains, &[append(11)]);
        assert_eq!(v, [Err(9)]);
        let (_, v) = batch(&chains, &[append(10)]);
        assert_eq!(v, [Ok(())]);
    }

    #[test]
    fn resync_and_forget() {
        let mut chains = Chains::default();
        let (b, _) = batch(&chains, &[append(1)]);
        chains.settle(b, false);
        // The failed commit reached the disk after all: what the disk says counts.
        chains.resync(7, Some(1));
        let (b, v) = batch(&chains, &[append(2)]);
        assert_eq!(v, [Ok(())]);
        chains.settle(b, true);
        let (b, v) = batch(&chains, &[Link::Forget { uid: 7 }]);
        assert_eq!(v, [Ok(())]);
        chains.settle(b, true);
        assert!(chains.uids().is_empty());
        chains.resync(8, None);
        assert!(chains.uids().is_empty());
    }

    #[test]
    fn an_unreadable_disk_keeps_the_chain() {
        let mut chains = Chains::default();
        let (b, _) = batch(&chains, &[append(1), append(2)]);
        chains.settle(b, true);
        let (b, _) = batch(&chains, &[append(3)]);
        chains.settle(b, false);
        chains.resync(7, None);
        let (_, v) = batch(&chains, &[append(5)]);
        assert_eq!(v, [Err(2)], "a stale op stays refused");
    }
}
