//! The lake on a local directory: its layout, the atomic publish of a
//! batch, the progress recorded in file names, and reading it back.
//!
//! Layout: `usage/date=YYYY-MM-DD/hour=HH/<source>~<start>~<end>~<i>of<n>.parquet`,
//! partitioned by the request's start time. A batch is one contiguous range
//! `[start, end)` of one source (a Kafka partition, or a gateway's spool),
//! written as one file per hour it touches. Each part is written under a
//! hidden temporary name, synced and renamed into place; the batch counts
//! as published once all `n` parts exist. The names are the progress
//! record: a restarted ingester resumes after the last complete batch and
//! removes the parts of an incomplete one, so nothing is written twice.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use chrono::{DateTime, Datelike, Timelike, Utc};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use tollgate_schemas::UsageEvent;

use crate::IngestError;
use crate::columns;

pub const USAGE: &str = "usage";
pub const DEAD_LETTERS: &str = "dead_letters";

#[derive(Debug, Clone)]
pub struct Lake {
    root: PathBuf,
}

/// A published file's name, parsed.
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
            "{}~{}~{}~{}of{}.parquet",
            self.source, self.start, self.end, self.part, self.parts
        )
    }

    pub fn parse(name: &str) -> Option<PartName> {
        let stem = name.strip_suffix(".parquet")?;
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

/// A published batch: its range and the files that hold it.
#[derive(Debug, Clone)]
pub struct Published {
    pub start: String,
    pub end: String,
    pub files: Vec<PathBuf>,
    pub rows: usize,
}

/// Names are kept to characters every object store and shell takes.
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

pub fn hour_dir(ts: DateTime<Utc>) -> String {
    format!(
        "date={:04}-{:02}-{:02}/hour={:02}",
        ts.year(),
        ts.month(),
        ts.day(),
        ts.hour()
    )
}

/// Parquet as the lake writes it: zstd, dictionary-encoded strings, page
/// statistics, time-sorted rows; random ids and timestamps skip the
/// dictionary (it cannot help them) and times are delta-encoded.
pub fn writer_properties() -> WriterProperties {
    let col = |name: &str| ColumnPath::from(name);
    let ts_start = tollgate_schemas::usage_schema()
        .index_of("ts_start")
        .unwrap_or(5);
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default()))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(1 << 20))
        .set_sorting_columns(Some(vec![SortingColumn {
            column_idx: ts_start as i32,
            descending: false,
            nulls_first: false,
        }]))
        .set_column_dictionary_enabled(col("event_id"), false)
        .set_column_dictionary_enabled(col("request_id"), false)
        .set_column_dictionary_enabled(col("ts_start"), false)
        .set_column_dictionary_enabled(col("ts_end"), false)
        .set_column_encoding(col("ts_start"), Encoding::DELTA_BINARY_PACKED)
        .set_column_encoding(col("ts_end"), Encoding::DELTA_BINARY_PACKED)
        .build()
}

/// Writes `batch` as one Parquet file at `path`, synced to disk.
pub fn write_parquet(path: &Path, batch: &RecordBatch) -> Result<u64, IngestError> {
    let file = File::create(path).map_err(IngestError::io(path))?;
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(writer_properties()))?;
    writer.write(batch)?;
    let file = writer.into_inner()?;
    file.sync_all().map_err(IngestError::io(path))?;
    file.metadata()
        .map(|m| m.len())
        .map_err(IngestError::io(path))
}

pub fn sync_dir(dir: &Path) -> Result<(), IngestError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(IngestError::io(dir))
}

impl Lake {
    pub fn open(root: impl Into<PathBuf>) -> Result<Lake, IngestError> {
        let root = root.into();
        for sub in [USAGE, DEAD_LETTERS] {
            let d = root.join(sub);
            fs::create_dir_all(&d).map_err(IngestError::io(&d))?;
        }
        Ok(Lake { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn usage_dir(&self) -> PathBuf {
        self.root.join(USAGE)
    }

    pub fn dead_letter_dir(&self) -> PathBuf {
        self.root.join(DEAD_LETTERS)
    }

    /// Publishes the events of one source range: deduplicated by event id
    /// (the first copy wins), one file per hour, sorted by start time.
    pub fn publish(
        &self,
        source: &str,
        start: &str,
        end: &str,
        events: Vec<UsageEvent>,
    ) -> Result<Published, IngestError> {
        let mut seen = HashSet::with_capacity(events.len());
        let mut by_hour: BTreeMap<String, Vec<UsageEvent>> = BTreeMap::new();
        for e in events {
            if seen.insert(e.event_id) {
                by_hour.entry(hour_dir(e.ts_start)).or_default().push(e);
            }
        }
        let parts = by_hour.len() as u32;
        let mut staged = Vec::with_capacity(by_hour.len());
        let mut rows = 0;
        for (i, (hour, mut events)) in by_hour.into_iter().enumerate() {
            events.sort_by_key(|e| (e.ts_start, e.event_id));
            rows += events.len();
            let dir = self.usage_dir().join(&hour);
            fs::create_dir_all(&dir).map_err(IngestError::io(&dir))?;
            let name = PartName {
                source: source.to_string(),
                start: start.to_string(),
                end: end.to_string(),
                part: i as u32,
                parts,
            }
            .file_name();
            let tmp = dir.join(format!(".{name}.tmp"));
            write_parquet(&tmp, &columns::to_batch(&events)?)?;
            staged.push((tmp, dir.join(name), dir));
        }
        let mut files = Vec::with_capacity(staged.len());
        for (tmp, path, dir) in staged {
            fs::rename(&tmp, &path).map_err(IngestError::io(&path))?;
            sync_dir(&dir)?;
            files.push(path);
        }
        Ok(Published {
            start: start.to_string(),
            end: end.to_string(),
            files,
            rows,
        })
    }

    /// Every published Parquet file, in path order.
    pub fn files(&self) -> Result<Vec<PathBuf>, IngestError> {
        let mut out = Vec::new();
        walk(&self.usage_dir(), &mut out)?;
        out.sort();
        Ok(out)
    }

    /// The published batches of `source`, as (start, end) pairs in order.
    /// Range bounds are zero-padded, so they order as text.
    ///
    /// A source publishes one batch at a time, so only its last batch can
    /// have been cut short by a crash: if that one lacks parts, the parts
    /// it has (and leftover temporary files) are removed and its range is
    /// left out, to be written again. An earlier batch with parts missing
    /// was compacted (its closed hours merged) and counts as published.
    pub fn recover_source(&self, source: &str) -> Result<Vec<(String, String)>, IngestError> {
        let mut batches: BTreeMap<(String, String), (u32, Vec<PathBuf>)> = BTreeMap::new();
        for path in self.files()? {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(part) = PartName::parse(name) else {
                continue;
            };
            if part.source != source {
                continue;
            }
            let entry = batches
                .entry((part.start, part.end))
                .or_insert((part.parts, Vec::new()));
            entry.1.push(path);
        }
        let last = batches.keys().next_back().cloned();
        let mut complete = Vec::new();
        for ((start, end), (parts, paths)) in batches {
            let torn =
                paths.len() as u32 != parts && last.as_ref() == Some(&(start.clone(), end.clone()));
            if !torn {
                complete.push((start, end));
                continue;
            }
            for p in &paths {
                tracing::warn!(file = %p.display(), "removing a part of a publish cut short; its range is ingested again");
                fs::remove_file(p).map_err(IngestError::io(p))?;
            }
        }
        self.remove_temporaries(source)?;
        Ok(complete)
    }

    fn remove_temporaries(&self, source: &str) -> Result<(), IngestError> {
        let prefix = format!(".{source}~");
        let mut dirs = Vec::new();
        walk_dirs(&self.usage_dir(), &mut dirs)?;
        for d in dirs {
            for entry in fs::read_dir(&d).map_err(IngestError::io(&d))? {
                let entry = entry.map_err(IngestError::io(&d))?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(&prefix) && name.ends_with(".tmp") {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }

    /// The files of one published batch.
    pub fn batch_files(
        &self,
        source: &str,
        start: &str,
        end: &str,
    ) -> Result<Vec<PathBuf>, IngestError> {
        Ok(self
            .files()?
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(PartName::parse)
                    .is_some_and(|n| n.source == source && n.start == start && n.end == end)
            })
            .collect())
    }

    /// Reads every event in the lake (tests, checks and small lakes).
    pub fn read_events(&self) -> Result<Vec<UsageEvent>, IngestError> {
        let mut out = Vec::new();
        for f in self.files()? {
            out.extend(read_file(&f)?);
        }
        Ok(out)
    }
}

/// Reads one lake file back into events.
pub fn read_file(path: &Path) -> Result<Vec<UsageEvent>, IngestError> {
    let file = File::open(path).map_err(IngestError::io(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    let mut out = Vec::new();
    for batch in reader {
        out.extend(columns::from_batch(&batch?)?);
    }
    Ok(out)
}

/// Reads only the event ids of a lake file.
pub fn read_event_ids(path: &Path) -> Result<Vec<uuid::Uuid>, IngestError> {
    use arrow_array::cast::AsArray;
    let file = File::open(path).map_err(IngestError::io(path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    let mask = parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), ["event_id"]);
    let mut out = Vec::new();
    for batch in builder.with_projection(mask).build()? {
        let batch = batch?;
        let Some(ids) = batch.column(0).as_fixed_size_binary_opt() else {
            continue;
        };
        out.extend(
            ids.iter()
                .flatten()
                .filter_map(|b| uuid::Uuid::from_slice(b).ok()),
        );
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), IngestError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(IngestError::io(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(IngestError::io(dir))?;
        let path = entry.path();
        let ty = entry.file_type().map_err(IngestError::io(&path))?;
        if ty.is_dir() {
            walk(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "parquet")
            && !entry.file_name().to_string_lossy().starts_with('.')
        {
            out.push(path);
        }
    }
    Ok(())
}

fn walk_dirs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), IngestError> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    out.push(dir.to_path_buf());
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk_dirs(&entry.path(), out)?;
        }
    }
    Ok(())
}
