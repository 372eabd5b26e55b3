//! Counters in this process: the whole truth without `[redis]`, and the
//! fallback (this gateway's own traffic) when Redis is away.
//!
//! One lock over every counter, so that a request's reservations across
//! all its rules are one step: either all are taken or none is.

use std::sync::Mutex;

use rustc_hash::FxHashMap;

use super::span::Frame;

/// Distinct key values kept per limit. Past it, idle counters are dropped
/// first; a value that still finds no room is counted with every other
/// such value under [`OVERFLOW_KEY`], so that no value goes uncounted.
const MAX_KEYS: usize = 100_000;

/// Where values past [`MAX_KEYS`] are counted together.
pub const OVERFLOW_KEY: &str = "(overflow)";

/// One reservation to make: a counter, its window now and the amount.
#[derive(Debug, Clone)]
pub struct Take<'a> {
    /// Index of the limit among all rules' limits.
    pub limit: usize,
    pub key: &'a str,
    pub frame: Frame,
    /// Tokens, requests or 10^-10 USD.
    pub amount: i64,
    pub ceiling: i64,
    /// `false`: counted but never refused (`alert_only`).
    pub enforce: bool,
}

/// A counter's figures in its window, reservations included in `used`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    pub used: i64,
    pub reserved: i64,
    /// The newest bucket with a figure, for the time of a full reset.
    pub newest: Option<i64>,
}

/// The first take that would go over: its index and the bucket whose
/// expiry frees enough room (`None`: the amount alone is over the limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Over {
    pub index: usize,
    pub frees_at: Option<i64>,
}

#[derive(Debug, Default)]
struct Counter {
    /// (bucket, used incl. reserved, reserved), oldest first.
    buckets: Vec<(i64, i64, i64)>,
    /// Sums over `buckets`, kept as they change.
    used: i64,
    reserved: i64,
}

impl Counter {
    fn prune(&mut self, oldest_live: i64) {
        if self.buckets.first().is_some_and(|b| b.0 < oldest_live) {
            let gone = self.buckets.partition_point(|b| b.0 < oldest_live);
            for (_, used, reserved) in self.buckets.drain(..gone) {
                self.used -= used;
                self.reserved -= reserved;
            }
        }
    }

    fn figures(&self) -> Figures {
        Figures {
            used: self.used,
            reserved: self.reserved,
            newest: self.buckets.iter().rev().find(|b| b.1 > 0).map(|b| b.0),
        }
    }

    fn add(&mut self, bucket: i64, used: i64, reserved: i64) {
        self.used = self.used.saturating_add(used);
        self.reserved = self.reserved.saturating_add(reserved);
        match self.buckets.iter_mut().rev().find(|b| b.0 == bucket) {
            Some(b) => {
                b.1 = b.1.saturating_add(used);
                b.2 = b.2.saturating_add(reserved);
            }
            None => {
                let at = self.buckets.partition_point(|b| b.0 < bucket);
                self.buckets.insert(at, (bucket, used, reserved));
            }
        }
    }

    /// The bucket whose expiry leaves room for `amount` under `ceiling`.
    fn frees_at(&self, amount: i64, ceiling: i64) -> Option<i64> {
        if amount > ceiling {
            return None;
        }
        let mut used = self.figures().used;
        for &(idx, u, _) in &self.buckets {
            used -= u;
            if used.saturating_add(amount) <= ceiling {
                return Some(idx);
            }
        }
        None
    }
}

/// Every limit's counters, by key value.
pub struct Local {
    counters: Mutex<Vec<FxHashMap<Box<str>, Counter>>>,
}

impl Local {
    pub fn new(limits: usize) -> Self {
        Self {
            counters: Mutex::new((0..limits).map(|_| FxHashMap::default()).collect()),
        }
    }

    /// The counters; a lock poisoned by a panic elsewhere is taken anyway
    /// (every change here is one step, so the counters stay whole), never
    /// a reason to stop counting.
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<FxHashMap<Box<str>, Counter>>> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes every amount, or none when one would go over its ceiling
    /// (`force`: takes them regardless, to mirror what Redis granted).
    /// The figures are each counter's after the take.
    pub fn take(&self, takes: &[Take], force: bool) -> Result<Vec<Figures>, Over> {
        let mut all = self.lock();
        if !force {
            for (index, t) in takes.iter().enumerate() {
                let Some(map) = all.get_mut(t.limit) else {
                    continue;
                };
                let Some(c) = map.get_mut(t.key) else {
                    if t.enforce && t.amount > t.ceiling {
                        return Err(Over {
                            index,
                            frees_at: None,
                        });
                    }
                    continue;
                };
                c.prune(t.frame.oldest_live);
                if t.enforce && c.figures().used.saturating_add(t.amount) > t.ceiling {
                    return Err(Over {
                        index,
                        frees_at: c.frees_at(t.amount, t.ceiling),
                    });
                }
            }
        }
        let mut out = Vec::with_capacity(takes.len());
        for t in takes {
            let Some(map) = all.get_mut(t.limit) else {
                out.push(Figures::default());
                continue;
            };
            let c = counter(map, t.key, t.frame.oldest_live);
            c.prune(t.frame.oldest_live);
            c.add(t.frame.current, t.amount, t.amount);
            out.push(c.figures());
        }
        Ok(out)
    }

    /// Moves a counter's bucket by `used` and `reserved` (a settlement:
    /// actual minus reserved, and minus reserved). A bucket that left the
    /// window is gone, and with it the need to settle it.
    pub fn settle(&self, limit: usize, key: &str, bucket: i64, used: i64, reserved: i64) {
        let mut all = self.lock();
        let Some(c) = all.get_mut(limit).and_then(|m| m.get_mut(key)) else {
            return;
        };
        if let Some(b) = c.buckets.iter_mut().rev().find(|b| b.0 == bucket) {
            let u = b.1.saturating_add(used).max(0);
            let r = b.2.saturating_add(reserved).max(0);
            c.used = c.used.saturating_add(u - b.1);
            c.reserved = c.reserved.saturating_add(r - b.2);
            (b.1, b.2) = (u, r);
        }
    }

    /// Adds `used` to a counter's bucket outright (a budget's spend rebuilt
    /// from the ledger).
    pub fn add(&self, limit: usize, key: &str, frame: Frame, used: i64) {
        let mut all = self.lock();
        if let Some(map) = all.get_mut(limit) {
            let c = counter(map, key, frame.oldest_live);
            c.prune(frame.oldest_live);
            c.add(frame.current, used, 0);
        }
    }

    /// Every counter with a figure in its window: (limit, key, figures).
    pub fn snapshot(&self, frames: &[Frame]) -> Vec<(usize, String, Figures)> {
        let mut all = self.lock();
        let mut out = Vec::new();
        for (limit, map) in all.iter_mut().enumerate() {
            let Some(frame) = frames.get(limit) else {
                continue;
            };
            map.retain(|_, c| {
                c.prune(frame.oldest_live);
                !c.buckets.is_empty()
            });
            for (key, c) in map.iter() {
                out.push((limit, key.to_string(), c.figures()));
            }
        }
        out.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        out
    }

    /// One counter's figures now (zero when it has none).
    pub fn figures(&self, limit: usize, key: &str, frame: Frame) -> Figures {
        let mut all = self.lock();
        match all.get_mut(limit).and_then(|m| m.get_mut(key)) {
            Some(c) => {
                c.prune(frame.oldest_live);
                c.figures()
            }
            None => Figures::default(),
        }
    }
}

/// The counter for `key`, made room for when the map is full.
fn counter<'m>(
    map: &'m mut FxHashMap<Box<str>, Counter>,
    key: &str,
    oldest_live: i64,
) -> &'m mut Counter {
    if !map.contains_key(key) && map.len() >= MAX_KEYS {
        map.retain(|_, c| c.buckets.iter().any(|b| b.0 >= oldest_live));
    }
    let key = if map.contains_key(key) || map.len() < MAX_KEYS {
        key
    } else {
        OVERFLOW_KEY
    };
    map.entry(key.into()).or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(key: &str, current: i64, amount: i64, ceiling: i64) -> Take<'_> {
        Take {
            limit: 0,
            key,
            frame: Frame {
                current,
                oldest_live: current - 59,
            },
            amount,
            ceiling,
            enforce: true,
        }
    }

    #[test]
    fn all_or_nothing_across_counters() {
        let l = Local::new(2);
        let mut second = take("a", 100, 5, 5);
        second.limit = 1;
        assert!(
            l.take(&[take("a", 100, 5, 10), second.clone()], false)
                .is_ok()
        );
        let over = l.take(&[take("a", 100, 5, 10), second], false).unwrap_err();
        assert_eq!(over.index, 1);
        let f = l.figures(0, "a", take("a", 100, 0, 0).frame);
        assert_eq!(f.used, 5, "the first take was not kept");
    }

    #[test]
    fn settling_moves_reserved_to_actual_and_windows_roll() {
        let l = Local::new(1);
        l.take(&[take("k", 100, 30, 100)], false).unwrap();
        l.settle(0, "k", 100, 12 - 30, -30);
        let f = l.figures(0, "k", take("k", 100, 0, 0).frame);
        assert_eq!((f.used, f.reserved), (12, 0));
        l.take(&[take("k", 130, 80, 100)], false).unwrap();
        let over = l.take(&[take("k", 131, 20, 100)], false).unwrap_err();
        assert_eq!(over.frees_at, Some(100), "room when bucket 100 leaves");
        assert!(
            l.take(&[take("k", 160, 20, 100)], false).is_ok(),
            "bucket 100 left"
        );
        let never = l.take(&[take("z", 160, 101, 100)], false).unwrap_err();
        assert_eq!(never.frees_at, None);
    }

    #[test]
    fn a_flood_of_values_lands_in_one_overflow_counter() {
        let l = Local::new(1);
        let mut all = l.counters.lock().unwrap();
        for i in 0..MAX_KEYS {
            all[0].insert(
                i.to_string().into(),
                Counter {
                    buckets: vec![(100, 1, 0)],
                    used: 1,
                    reserved: 0,
                },
            );
        }
        drop(all);
        l.take(&[take("new", 100, 1, 10)], false).unwrap();
        l.take(&[take("newer", 100, 1, 10)], false).unwrap();
        let f = l.figures(0, OVERFLOW_KEY, take("", 100, 0, 0).frame);
        assert_eq!(f.used, 2);
    }
}
