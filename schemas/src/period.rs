//! Calendar periods in a time zone: a budget's day, week or month, which
//! start at local midnight (a month in Asia/Shanghai starts at 16:00 UTC
//! the day before). Shared by the gateway's budgets and the query
//! service's `budgets` table, so both cut periods alike.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

/// A budget's calendar period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    /// Monday to Sunday, as ISO 8601 has it.
    Week,
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// `day`, `week` or `month`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "day" => Some(Period::Day),
            "week" => Some(Period::Week),
            "month" => Some(Period::Month),
            _ => None,
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
    fn a_skipped_midnight_starts_the_day_at_its_first_instant() {
        // Santiago skipped 2024-09-08 00:00 (clocks went to 01:00).
        let tz = chrono_tz::America::Santiago;
        let start = period_start(Period::Day, tz, at("2024-09-08T12:00:00Z"));
        assert_eq!(start, at("2024-09-08T04:00:00Z"));
    }
}
