//! Where a counter's figures live in time: rolling windows cut into
//! buckets, and calendar periods in a time zone.
//!
//! A rolling window of length W is [`BUCKETS`] buckets of W/BUCKETS; the
//! window at `now` is the bucket holding `now` and the ones before it, so a
//! figure leaves the window at most one bucket late (1 s of a minute, 1 min
//! of an hour). A calendar period is one bucket numbered by its start.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use tollgate_schemas::period::{Period, period_end, period_start};

use crate::config::limits::Window;

/// Buckets per rolling window.
pub const BUCKETS: i64 = 60;

/// How one limit counts in time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Span {
    Rolling(Window),
    Calendar(Period, Tz),
}

/// The buckets of a span at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The bucket `now` falls in: a rolling bucket's number, or a period's
    /// start in Unix seconds.
    pub current: i64,
    /// The oldest bucket still inside the window (== `current` for a period).
    pub oldest_live: i64,
}

impl Span {
    fn bucket_ms(window: Window) -> i64 {
        window.length().as_millis() as i64 / BUCKETS
    }

    pub fn frame(&self, now: DateTime<Utc>) -> Frame {
        match self {
            Span::Rolling(w) => {
                let current = now.timestamp_millis().div_euclid(Self::bucket_ms(*w));
                Frame {
                    current,
                    oldest_live: current - BUCKETS + 1,
                }
            }
            Span::Calendar(p, tz) => {
                let start = period_start(*p, *tz, now).timestamp();
                Frame {
                    current: start,
                    oldest_live: start,
                }
            }
        }
    }

    /// When a figure put in `bucket` no longer counts.
    pub fn expiry(&self, bucket: i64) -> DateTime<Utc> {
        match self {
            Span::Rolling(w) => {
                let ms = (bucket + BUCKETS) * Self::bucket_ms(*w);
                DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MAX_UTC)
            }
            Span::Calendar(p, tz) => {
                let start = DateTime::from_timestamp(bucket, 0).unwrap_or_default();
                period_end(*p, *tz, start)
            }
        }
    }

    /// How long a store keeps a bucket: past its expiry, with a margin.
    pub fn keep_ms(&self, bucket: i64, now: DateTime<Utc>) -> i64 {
        (self.expiry(bucket) - now).num_milliseconds().max(0) + 60_000
    }

    /// The window's name in keys and views: `minute`, `month`, ...
    pub fn name(&self) -> &'static str {
        match self {
            Span::Rolling(w) => w.as_str(),
            Span::Calendar(p, _) => p.as_str(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn rolling_buckets_cover_the_window() {
        let s = Span::Rolling(Window::Minute);
        let now = at("2026-11-30T10:00:30.500Z");
        let f = s.frame(now);
        assert_eq!(f.current - f.oldest_live, BUCKETS - 1);
        assert_eq!(s.expiry(f.current), at("2026-11-30T10:01:30Z"));
        assert_eq!(s.expiry(f.oldest_live), at("2026-11-30T10:00:31Z"));
    }
}
