//! Every key in the lake, in one place:
//!
//! ```text
//! usage/date=YYYY-MM-DD/hour=HH/<source>~<start>~<end>~<i>of<n>.parquet   published batches
//! usage/date=YYYY-MM-DD/hour=HH/compacted-<first>-<last>-<rows>.parquet   merged closed hours
//! dead_letters/date=YYYY-MM-DD/<source>~<position>.json                   refused messages
//! ```
//!
//! Partitions are Hive style by the request's start time, so any Parquet
//! reader (DuckDB, DataFusion, Spark) sees `date` and `hour` as columns. A
//! published batch's name is its progress record: the source (a Kafka
//! partition or a gateway's spool) and the offset range `[start, end)` it
//! holds, part `i` of `n` (one file per hour the batch touches).

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, Timelike, Utc};

/// The prefix of the usage rows.
pub const USAGE: &str = "usage";
/// The prefix of the messages that were not valid events.
pub const DEAD_LETTERS: &str = "dead_letters";
/// The Hive partition columns under [`USAGE`], outermost first.
pub const PARTITION_COLUMNS: [&str; 2] = ["date", "hour"];
/// The extension of every usage file.
pub const PARQUET: &str = ".parquet";
/// How a merged file's name starts.
pub const COMPACTED: &str = "compacted-";

/// A published batch file's name, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartName {
    pub source: String,
    pub start: String,
    pub end: String,
    pub part: u32,
    pub parts: u32,
}

impl PartName {
    pub fn file_name(&self) -> String {
        format!(
            "{}~{}~{}~{}of{}{PARQUET}",
            self.source, self.start, self.end, self.part, self.parts
        )
    }

    /// The start of every part file's name from `source` (cleaned), for
    /// finding what a publish cut short left behind.
    pub fn prefix_of(source: &str) -> String {
        format!("{source}~")
    }

    /// `None` for any other name (a merged file, a temporary).
    pub fn parse(name: &str) -> Option<PartName> {
        let stem = name.strip_suffix(PARQUET)?;
        let mut it = stem.split('~');
        let (source, start, end, part) = (it.next()?, it.next()?, it.next()?, it.next()?);
        if it.next().is_some() {
            return None;
        }
        let (i, n) = part.split_once("of")?;
        Some(PartName {
            source: source.to_string(),
            start: start.to_string(),
            end: end.to_string(),
            part: i.parse().ok()?,
            parts: n.parse().ok()?,
        })
    }
}

/// A source name kept to characters every object store and shell takes.
pub fn clean_source(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The partition directory of the hour `ts` falls in:
/// `date=YYYY-MM-DD/hour=HH`.
pub fn hour_dir(ts: DateTime<Utc>) -> String {
    format!(
        "date={:04}-{:02}-{:02}/hour={:02}",
        ts.year(),
        ts.month(),
        ts.day(),
        ts.hour()
    )
}

/// The key of a usage file named `name` in the hour directory `hour`.
pub fn usage_key(hour: &str, name: &str) -> String {
    format!("{USAGE}/{hour}/{name}")
}

/// The name of a merged file of `rows` rows whose start times span
/// `[first, last]` (microseconds since the epoch).
pub fn compacted_name(first: i64, last: i64, rows: usize) -> String {
    format!("{COMPACTED}{first}-{last}-{rows}{PARQUET}")
}

/// The key of a dead letter from `source` at `position`, filed under the
/// day it arrived.
pub fn dead_letter_key(arrived: DateTime<Utc>, source: &str, position: &str) -> String {
    format!(
        "{DEAD_LETTERS}/date={}/{source}~{position}.json",
        arrived.format("%Y-%m-%d")
    )
}

/// The day and hour a `usage/date=D/hour=H/...` key sits in.
pub fn hour_of(key: &str) -> Option<(NaiveDate, DateTime<Utc>)> {
    let mut date = None;
    let mut hour = None;
    for part in key.split('/') {
        if let Some(d) = part.strip_prefix("date=") {
            date = NaiveDate::parse_from_str(d, "%Y-%m-%d").ok();
        }
        if let Some(h) = part.strip_prefix("hour=") {
            hour = h
                .parse::<u32>()
                .ok()
                .and_then(|h| NaiveTime::from_hms_opt(h, 0, 0));
        }
    }
    let (d, h) = (date?, hour?);
    Some((d, d.and_time(h).and_utc()))
}

/// When the hour of a key ends.
pub fn hour_end(start: DateTime<Utc>) -> DateTime<Utc> {
    start + Duration::hours(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    #[test]
    fn keys_are_hive_partitioned_by_the_hour() {
        let ts = Utc.with_ymd_and_hms(2026, 11, 29, 7, 59, 59).unwrap();
        let hour = hour_dir(ts);
        assert_eq!(hour, "date=2026-11-29/hour=07");
        let key = usage_key(&hour, &compacted_name(1, 2, 3));
        assert_eq!(key, "usage/date=2026-11-29/hour=07/compacted-1-2-3.parquet");
        let (day, start) = hour_of(&key).unwrap();
        assert_eq!(day, NaiveDate::from_ymd_opt(2026, 11, 29).unwrap());
        assert_eq!(start, Utc.with_ymd_and_hms(2026, 11, 29, 7, 0, 0).unwrap());
        assert_eq!(
            dead_letter_key(ts, "tollgate.usage.v1.3", "42"),
            "dead_letters/date=2026-11-29/tollgate.usage.v1.3~42.json"
        );
        assert_eq!(hour_of("usage/date=x/hour=07/a.parquet"), None);
    }

    #[test]
    fn only_batch_names_parse_as_batches() {
        assert_eq!(PartName::parse("compacted-1-2-3.parquet"), None);
        assert_eq!(PartName::parse("a~1~2~1of2.json"), None);
        assert_eq!(PartName::parse("a~1~2~3~1of2.parquet"), None);
        assert_eq!(clean_source("spool.gw 1/ü"), "spool.gw_1__");
    }

    proptest! {
        #[test]
        fn a_batch_name_parses_back_to_itself(
            source in "[a-z0-9._-]{1,20}",
            start in "[0-9]{1,12}",
            end in "[0-9]{1,12}",
            part in 1u32..100,
            parts in 1u32..100,
        ) {
            let n = PartName { source, start, end, part, parts };
            prop_assert_eq!(PartName::parse(&n.file_name()), Some(n));
        }
    }
}
