//! Compaction: the many small files of each closed hour merged into a few
//! large ones, atomically and idempotently.
//!
//! The merged file appears whole (see `store`) and records its inputs in
//! its Parquet metadata; only then are the inputs deleted. A run cut short
//! between the two is finished by the next run, which first deletes the
//! inputs of every merged file it finds. Rows are deduplicated by event id
//! and put in the lake's row order. The last batch of each source is left
//! alone: an ingester uses it to find where it stopped.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, NaiveDate, Utc};
use parquet::file::metadata::KeyValue;
use tollgate_schemas::UsageEvent;

use tollgate_lake::layout::{self, PartName};

use crate::lake::{Lake, parquet_bytes, row_order, writer_properties};
use crate::{IngestError, columns};

/// Rows per merged file; bounds the memory a merge takes.
pub const MAX_ROWS: usize = 500_000;
/// An hour is closed this long after it ends (late events settle).
pub const GRACE: Duration = Duration::minutes(15);
const FROM_KEY: &str = "tollgate.compacted_from";

#[derive(Debug, Default, Clone)]
pub struct Report {
    pub hours: usize,
    pub files_in: usize,
    pub files_out: usize,
    pub rows: usize,
    /// Inputs of an earlier, interrupted run that were deleted now.
    pub finished_interrupted: usize,
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// When the hour a `usage/date=D/hour=H/` key sits in closes.
fn closes(key: &str) -> Option<(NaiveDate, DateTime<Utc>)> {
    let (day, start) = layout::hour_of(key)?;
    Some((day, layout::hour_end(start) + GRACE))
}

/// The files of each source's last batch: kept out of merges.
fn last_batches(files: &[PathBuf]) -> HashSet<String> {
    let mut last: BTreeMap<String, (String, String)> = BTreeMap::new();
    for f in files {
        if let Some(n) = PartName::parse(&file_name(f)) {
            let range = (n.start.clone(), n.end.clone());
            let e = last.entry(n.source).or_insert_with(|| range.clone());
            if range > *e {
                *e = range;
            }
        }
    }
    files
        .iter()
        .map(|f| file_name(f))
        .filter(|name| {
            PartName::parse(name).is_some_and(|n| last.get(&n.source) == Some(&(n.start, n.end)))
        })
        .collect()
}

/// Deletes inputs that a merged file of this hour already holds.
fn finish_interrupted(lake: &Lake, files: &mut Vec<PathBuf>) -> Result<usize, IngestError> {
    let mut done: HashSet<String> = HashSet::new();
    for f in files
        .iter()
        .filter(|f| file_name(f).starts_with(layout::COMPACTED))
    {
        let Some(from) = lake.file_metadata(f, FROM_KEY)? else {
            continue;
        };
        let inputs: Vec<String> = serde_json::from_str(&from).unwrap_or_default();
        done.extend(inputs.into_iter().filter(|n| *n != file_name(f)));
    }
    let before = files.len();
    let mut kept = Vec::with_capacity(files.len());
    for f in files.drain(..) {
        if done.contains(&file_name(&f)) {
            lake.remove(&f)?;
        } else {
            kept.push(f);
        }
    }
    *files = kept;
    Ok(before - files.len())
}

/// Compacts every closed hour (of `date`, if given). `on_hour` is called
/// before each hour with its index and the total, for a progress bar.
pub fn compact(
    lake: &Lake,
    date: Option<NaiveDate>,
    now: DateTime<Utc>,
    mut on_hour: impl FnMut(usize, usize, &str),
) -> Result<Report, IngestError> {
    let mut report = Report::default();
    let all = lake.files()?;
    let keep = last_batches(&all);
    let mut hours: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for f in all {
        let key = lake.key_of(&f);
        let dir = key.rsplit_once('/').map_or("", |(d, _)| d).to_string();
        let Some((day, closes_at)) = closes(&dir) else {
            continue;
        };
        if closes_at <= now && date.is_none_or(|want| want == day) {
            hours.entry(dir).or_default().push(f);
        }
    }
    let total = hours.len();
    for (i, (dir, mut files)) in hours.into_iter().enumerate() {
        on_hour(i, total, &dir);
        report.finished_interrupted += finish_interrupted(lake, &mut files)?;
        let inputs: Vec<PathBuf> = files
            .into_iter()
            .filter(|f| !keep.contains(&file_name(f)))
            .collect();
        // A lone file is left as it is, unless it still carries the UUID
        // annotation Spark refuses: then it is rewritten too.
        if inputs.len() == 1 && !lake.has_uuid_annotation(&inputs[0])? {
            continue;
        }
        if inputs.is_empty() {
            continue;
        }
        report.hours += 1;
        report.files_in += inputs.len();
        // Inputs in chunks of about MAX_ROWS rows each.
        let mut chunk: Vec<PathBuf> = Vec::new();
        let mut rows: Vec<UsageEvent> = Vec::new();
        for f in inputs {
            let events = lake.read_file(&f)?;
            if !chunk.is_empty() && rows.len() + events.len() > MAX_ROWS {
                report.rows += merge(lake, &dir, &chunk, std::mem::take(&mut rows))?;
                report.files_out += 1;
                chunk.clear();
            }
            rows.extend(events);
            chunk.push(f);
        }
        if chunk.len() > 1 || (chunk.len() == 1 && lake.has_uuid_annotation(&chunk[0])?) {
            report.rows += merge(lake, &dir, &chunk, rows)?;
            report.files_out += 1;
        } else {
            report.files_in -= chunk.len();
        }
    }
    Ok(report)
}

/// Writes `rows` (the contents of `inputs`) as one merged file in `dir`,
/// then deletes the inputs. Returns the rows written.
fn merge(
    lake: &Lake,
    dir: &str,
    inputs: &[PathBuf],
    rows: Vec<UsageEvent>,
) -> Result<usize, IngestError> {
    let mut seen = HashSet::with_capacity(rows.len());
    let mut rows: Vec<UsageEvent> = rows
        .into_iter()
        .filter(|e| seen.insert(e.event_id))
        .collect();
    rows.sort_by(row_order);
    let names: BTreeSet<String> = inputs.iter().map(|p| file_name(p)).collect();
    // Named for the time span it holds (rows are not in time order).
    let micros = rows.iter().map(|e| e.ts_start.timestamp_micros());
    let first = micros.clone().min().unwrap_or(0);
    let last = micros.max().unwrap_or(0);
    let key = format!("{dir}/{}", layout::compacted_name(first, last, rows.len()));
    let props = writer_properties()
        .into_builder()
        .set_key_value_metadata(Some(vec![KeyValue::new(
            FROM_KEY.to_string(),
            serde_json::to_string(&names).unwrap_or_default(),
        )]))
        .build();
    let bytes = parquet_bytes(&columns::to_batch(&rows)?, props)?;
    let merged = lake.put(&key, bytes)?;
    for p in inputs {
        if *p != merged {
            lake.remove(p)?;
        }
    }
    Ok(rows.len())
}
