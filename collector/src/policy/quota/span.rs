//! Where a counter's figures live in time: rolling windows cut into
//! buckets, and calendar periods in a time zone.
//!
//! A rolling window of length W is [`BUCKETS`] buckets of W/BUCKETS; the
//! window at `now` is the bucket holding `now` and the ones before it, so a
//! figure leaves the window at most one bucket late (1 s of a minute, 1 min
//! of an hour). A calendar period is one bucket numbered by its start.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

use crate::config::limits::{Period, Window};

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

/// Local midnight starting `date` in `tz`; on a day whose midnight is
/// skipped by a clock change, the first instant of the day.
fn midnight(tz: Tz, date: NaiveDate) -> DateTime<Utc> {
    let naive = date.and_hms_opt(0, 0, 0).unwrap_or_default();
    for hour in 0..3 {
        if let Some(t) = tz
            .from_local_datetime(&(naive + Duration::hours(hour)))
            .earliest()
        {
            return t.with_timezone(&Utc);
        }
    }
    Utc.from_utc_datetime(&naive)
}

/// The start of the calendar period holding `now` in `tz` (weeks start on
/// Monday, as ISO 8601 has it).
pub fn period_start(period: Period, tz: Tz, now: DateTime<Utc>) -> DateTime<Utc> {
    let local = now.with_timezone(&tz).date_naive();
    let date = match period {
        Period::Day => local,
        Period::Week => local - Duration::days(local.weekday().num_days_from_monday() as i64),
        Period::Month => local.with_day(1).unwrap_or(local),
    };
    midnight(tz, date)
}

/// The end of the period that starts at `start` (the next one's start).
pub fn period_end(period: Period, tz: Tz, start: DateTime<Utc>) -> DateTime<Utc> {
    let local = start.with_timezone(&tz).date_naive();
    let next = match period {
        Period::Day => local + Duration::days(1),
        Period::Week => local + Duration::days(7),
        Period::Month => {
            let (y, m) = if local.month() == 12 {
                (local.year() + 1, 1)
            } else {
                (local.year(), local.month() + 1)
            };
            NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(local + Duration::days(31))
        }
    };
    midnight(tz, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_month_in_shanghai_starts_at_16_utc_the_day_before() {
        let tz = chrono_tz::Asia::Shanghai;
        let start = period_start(Period::Month, tz, at("2026-12-01T03:00:00Z"));
        assert_eq!(start, at("2026-11-30T16:00:00Z"));
        let before = period_start(Period::Month, tz, at("2026-11-30T15:59:59Z"));
        assert_eq!(before, at("2026-10-31T16:00:00Z"));
        assert_eq!(
            period_end(Period::Month, tz, before),
            at("2026-11-30T16:00:00Z")
        );
        let dec = period_start(Period::Month, tz, at("2026-12-31T16:00:00Z"));
        assert_eq!(dec, at("2026-12-31T16:00:00Z"), "January starts then");
    }

    #[test]
    fn days_and_weeks_roll_at_local_midnight() {
        let utc = chrono_tz::UTC;
        assert_eq!(
            period_start(Period::Day, utc, at("2026-11-30T23:59:59Z")),
            at("2026-11-30T00:00:00Z")
        );
        assert_eq!(
            period_start(Period::Day, utc, at("2026-12-01T00:00:00Z")),
            at("2026-12-01T00:00:00Z")
        );
        // 2026-11-30 is a Monday.
        assert_eq!(
            period_start(Period::Week, utc, at("2026-12-06T12:00:00Z")),
            at("2026-11-30T00:00:00Z")
        );
        let sh = chrono_tz::Asia::Shanghai;
        assert_eq!(
            period_start(Period::Day, sh, at("2026-11-30T16:00:00Z")),
            at("2026-11-30T16:00:00Z")
        );
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

    #[test]
    fn a_skipped_midnight_starts_the_day_at_its_first_instant() {
        // Santiago skipped 2024-09-08 00:00 (clocks went to 01:00).
        let tz = chrono_tz::America::Santiago;
        let start = period_start(Period::Day, tz, at("2024-09-08T12:00:00Z"));
        assert_eq!(start, at("2024-09-08T04:00:00Z"));
    }
}
