//! Compaction: the many small files of each closed hour merged into a few
//! large ones, atomically and idempotently.
//!
//! The merged file is written under a temporary name, synced and renamed
//! into place, and records its inputs in its Parquet metadata; only then
//! are the inputs deleted. A run cut short between the rename and the
//! deletes is finished by the next run, which first deletes the inputs of
//! every merged file it finds. Rows are deduplicated by event id and sorted
//! by time. The last batch of each source is left alone: an ingester uses
//! it to find where it stopped.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, Utc};
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::reader::FileReader;
use parquet::file::serialized_reader::SerializedFileReader;
use tollgate_schemas::UsageEvent;

use crate::lake::{Lake, PartName, read_file, sync_dir, writer_properties};
use crate::{IngestError, columns};

/// Rows per merged file; bounds the memory a merge takes.
pub const MAX_ROWS: usize = 500_000;
/// An hour is closed this long after it ends (late events settle).
pub const GRACE: Duration = Duration::minutes(15);
const FROM_KEY: &str = "tollgate.compacted_from";
const PREFIX: &str = "compacted-";

#[derive(Debug, Default, Clone)]
pub struct Report {
    pub hours: usize,
    pub files_in: usize,
    pub files_out: usize,
    pub rows: usize,
    /// Inputs of an earlier, interrupted run that were deleted now.
    pub finished_interrupted: usize,
}

/// One hour directory and when it closes.
struct Hour {
    dir: PathBuf,
    closes: DateTime<Utc>,
}

fn hours(lake: &Lake, date: Option<NaiveDate>) -> Result<Vec<Hour>, IngestError> {
    let mut out = Vec::new();
    let usage = lake.usage_dir();
    let Ok(days) = fs::read_dir(&usage) else {
        return Ok(out);
    };
    for day in days.flatten() {
        let name = day.file_name().to_string_lossy().into_owned();
        let Some(d) = name
            .strip_prefix("date=")
            .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
        else {
            continue;
        };
        if date.is_some_and(|want| want != d) {
            continue;
        }
        for hour in fs::read_dir(day.path())
            .map_err(IngestError::io(&day.path()))?
            .flatten()
        {
            let hname = hour.file_name().to_string_lossy().into_owned();
            let Some(h) = hname
                .strip_prefix("hour=")
                .and_then(|h| h.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(start) = NaiveTime::from_hms_opt(h, 0, 0) else {
                continue;
            };
            out.push(Hour {
                dir: hour.path(),
                closes: d.and_time(start).and_utc() + Duration::hours(1) + GRACE,
            });
        }
    }
    out.sort_by(|a, b| a.dir.cmp(&b.dir));
    Ok(out)
}

fn parquet_files(dir: &Path) -> Result<Vec<PathBuf>, IngestError> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(IngestError::io(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "parquet")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    v.sort();
    Ok(v)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The files of each source's last batch: kept out of merges.
fn last_batches(lake: &Lake) -> Result<HashSet<String>, IngestError> {
    let mut last: BTreeMap<String, (String, String)> = BTreeMap::new();
    let files = lake.files()?;
    for f in &files {
        if let Some(n) = PartName::parse(&file_name(f)) {
            let range = (n.start.clone(), n.end.clone());
            let e = last.entry(n.source).or_insert_with(|| range.clone());
            if range > *e {
                *e = range;
            }
        }
    }
    Ok(files
        .iter()
        .map(|f| file_name(f))
        .filter(|name| {
            PartName::parse(name).is_some_and(|n| last.get(&n.source) == Some(&(n.start, n.end)))
        })
        .collect())
}

/// Deletes inputs that a merged file in `dir` already holds.
fn finish_interrupted(dir: &Path) -> Result<usize, IngestError> {
    let mut removed = 0;
    for f in parquet_files(dir)? {
        if !file_name(&f).starts_with(PREFIX) {
            continue;
        }
        let reader = SerializedFileReader::new(File::open(&f).map_err(IngestError::io(&f))?)?;
        let from = reader
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| {
                kv.iter()
                    .find(|k| k.key == FROM_KEY)
                    .and_then(|k| k.value.clone())
            });
        let Some(from) = from else { continue };
        let inputs: Vec<String> = serde_json::from_str(&from).unwrap_or_default();
        for name in inputs {
            let p = dir.join(&name);
            if p.exists() && name != file_name(&f) {
                fs::remove_file(&p).map_err(IngestError::io(&p))?;
                removed += 1;
            }
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Compacts every closed hour (of `date`, if given). `on_hour` is called
/// before each hour with its index and the total, for a progress bar.
pub fn compact(
    lake: &Lake,
    date: Option<NaiveDate>,
    now: DateTime<Utc>,
    mut on_hour: impl FnMut(usize, usize, &Path),
) -> Result<Report, IngestError> {
    let mut report = Report::default();
    let keep = last_batches(lake)?;
    let closed: Vec<Hour> = hours(lake, date)?
        .into_iter()
        .filter(|h| h.closes <= now)
        .collect();
    for (i, hour) in closed.iter().enumerate() {
        on_hour(i, closed.len(), &hour.dir);
        report.finished_interrupted += finish_interrupted(&hour.dir)?;
        let inputs: Vec<PathBuf> = parquet_files(&hour.dir)?
            .into_iter()
            .filter(|f| !keep.contains(&file_name(f)))
            .collect();
        let merged_already = inputs.len() == 1 && file_name(&inputs[0]).starts_with(PREFIX);
        if inputs.len() < 2 || merged_already {
            continue;
        }
        report.hours += 1;
        report.files_in += inputs.len();
        // Inputs in chunks of about MAX_ROWS rows each.
        let mut chunk: Vec<PathBuf> = Vec::new();
        let mut rows: Vec<UsageEvent> = Vec::new();
        for f in inputs {
            let events = read_file(&f)?;
            if !chunk.is_empty() && rows.len() + events.len() > MAX_ROWS {
                report.rows += merge(&hour.dir, &chunk, std::mem::take(&mut rows))?;
                report.files_out += 1;
                chunk.clear();
            }
            rows.extend(events);
            chunk.push(f);
        }
        if chunk.len() > 1 {
            report.rows += merge(&hour.dir, &chunk, rows)?;
            report.files_out += 1;
        } else {
            report.files_in -= chunk.len();
        }
    }
    Ok(report)
}

/// Writes `rows` (the contents of `inputs`) as one merged file, then
/// deletes the inputs. Returns the rows written.
fn merge(dir: &Path, inputs: &[PathBuf], rows: Vec<UsageEvent>) -> Result<usize, IngestError> {
    let mut seen = HashSet::with_capacity(rows.len());
    let mut rows: Vec<UsageEvent> = rows
        .into_iter()
        .filter(|e| seen.insert(e.event_id))
        .collect();
    rows.sort_by_key(|e| (e.ts_start, e.event_id));
    let names: BTreeSet<String> = inputs.iter().map(|p| file_name(p)).collect();
    let first = rows.first().map_or(0, |e| e.ts_start.timestamp_micros());
    let last = rows.last().map_or(0, |e| e.ts_start.timestamp_micros());
    let name = format!("{PREFIX}{first}-{last}-{}.parquet", rows.len());
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(&name);

    let batch = columns::to_batch(&rows)?;
    let props = writer_properties()
        .into_builder()
        .set_key_value_metadata(Some(vec![KeyValue::new(
            FROM_KEY.to_string(),
            serde_json::to_string(&names).unwrap_or_default(),
        )]))
        .build();
    let file = File::create(&tmp).map_err(IngestError::io(&tmp))?;
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props))?;
    writer.write(&batch)?;
    writer
        .into_inner()?
        .sync_all()
        .map_err(IngestError::io(&tmp))?;
    fs::rename(&tmp, &path).map_err(IngestError::io(&path))?;
    sync_dir(dir)?;
    for p in inputs {
        if *p != path {
            fs::remove_file(p).map_err(IngestError::io(p))?;
        }
    }
    sync_dir(dir)?;
    Ok(rows.len())
}
