//! The lake as the ingester writes it: the atomic publish of a batch, the
//! progress recorded in file names, and reading it back, on any [`Store`],
//! in the layout `tollgate_lake::layout` owns. A batch is one contiguous range
//! `[start, end)` of one source (a Kafka partition, or a gateway's spool),
//! written as one file per hour it touches; each file appears whole, and
//! the batch counts as published once all `n` parts exist. The names are
//! the progress record: a restarted ingester resumes after the last batch
//! and removes the parts of one cut short, so nothing is written twice.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::reader::FileReader;
use parquet::file::serialized_reader::SerializedFileReader;
use parquet::schema::types::ColumnPath;
use tollgate_schemas::UsageEvent;

use crate::IngestError;
use crate::columns;
use chrono::{DateTime, Utc};
use tollgate_lake::Store;
use tollgate_lake::layout::{self, DEAD_LETTERS, PARQUET, PartName, USAGE, hour_dir, usage_key};

#[derive(Debug, Clone)]
pub struct Lake {
    store: Store,
}

/// A published batch: its range and the files that hold it.
#[derive(Debug, Clone)]
pub struct Published {
    pub start: String,
    pub end: String,
    pub files: Vec<PathBuf>,
    pub rows: usize,
}

/// The order of rows inside a file: by consumer, then the model that did
/// the work, then start time. The reports group on exactly these keys, so
/// runs of equal keys keep the aggregation's hash probes on hot groups, and
/// a consumer's rows lie together in every file.
pub fn row_order(a: &UsageEvent, b: &UsageEvent) -> Ordering {
    fn model(e: &UsageEvent) -> Option<&String> {
        e.served_model.as_ref().or(e.requested_model.as_ref())
    }
    a.consumer
        .cmp(&b.consumer)
        .then_with(|| model(a).cmp(&model(b)))
        .then_with(|| (a.ts_start, a.event_id).cmp(&(b.ts_start, b.event_id)))
}

/// Parquet as the lake writes it: zstd, dictionary-encoded strings, page
/// statistics, rows in [`row_order`]; random ids and timestamps skip the
/// dictionary (it cannot help them) and times are delta-encoded.
pub fn writer_properties() -> WriterProperties {
    let col = |name: &str| ColumnPath::from(name);
    let consumer = tollgate_schemas::usage_schema()
        .index_of("consumer")
        .unwrap_or(11);
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default()))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(1 << 20))
        // The leading key of `row_order`; Parquet cannot name the rest.
        .set_sorting_columns(Some(vec![SortingColumn {
            column_idx: consumer as i32,
            descending: false,
            nulls_first: true,
        }]))
        .set_column_dictionary_enabled(col("event_id"), false)
        .set_column_dictionary_enabled(col("request_id"), false)
        .set_column_dictionary_enabled(col("ts_start"), false)
        .set_column_dictionary_enabled(col("ts_end"), false)
        // Amounts are nearly all distinct: plain INT64 under zstd is smaller
        // than a dictionary and is read without a lookup.
        .set_column_dictionary_enabled(col("cost_usd"), false)
        .set_column_dictionary_enabled(col("cost_saved_usd"), false)
        .set_column_encoding(col("ts_start"), Encoding::DELTA_BINARY_PACKED)
        .set_column_encoding(col("ts_end"), Encoding::DELTA_BINARY_PACKED)
        .build()
}

/// One Parquet file's bytes.
pub fn parquet_bytes(batch: &RecordBatch, props: WriterProperties) -> Result<Vec<u8>, IngestError> {
    let mut writer = ArrowWriter::try_new(Vec::new(), batch.schema(), Some(props))?;
    writer.write(batch)?;
    Ok(writer.into_inner()?)
}

impl Lake {
    /// A lake in a local directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Lake, IngestError> {
        let root = root.into();
        for sub in [USAGE, DEAD_LETTERS] {
            let d = root.join(sub);
            std::fs::create_dir_all(&d).map_err(IngestError::io(&d))?;
        }
        Ok(Lake {
            store: Store::Dir(root),
        })
    }

    /// A lake at `location`: a local directory or `s3://bucket/prefix`
    /// (with `options`, see [`Store::open`]).
    pub fn at(location: &str, options: &[(String, String)]) -> Result<Lake, IngestError> {
        match Store::open(location, options)? {
            Store::Dir(root) => Lake::open(root),
            store => Ok(Lake { store }),
        }
    }

    pub fn describe(&self) -> String {
        self.store.describe()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A key as the path callers see: absolute for a directory, the key
    /// itself for an object store.
    pub fn path_of(&self, key: &str) -> PathBuf {
        match &self.store {
            Store::Dir(root) => root.join(key),
            Store::Object { .. } => PathBuf::from(key),
        }
    }

    pub fn key_of(&self, path: &Path) -> String {
        let rel = match &self.store {
            Store::Dir(root) => path.strip_prefix(root).unwrap_or(path),
            Store::Object { .. } => path,
        };
        rel.to_string_lossy().replace('\\', "/")
    }

    /// Publishes the events of one source range: deduplicated by event id
    /// (the first copy wins), one file per hour, in [`row_order`].
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
        let mut items = Vec::with_capacity(by_hour.len());
        let mut rows = 0;
        for (i, (hour, mut events)) in by_hour.into_iter().enumerate() {
            events.sort_by(row_order);
            rows += events.len();
            let name = PartName {
                source: source.to_string(),
                start: start.to_string(),
                end: end.to_string(),
                part: i as u32,
                parts,
            }
            .file_name();
            let bytes = parquet_bytes(&columns::to_batch(&events)?, writer_properties())?;
            items.push((usage_key(&hour, &name), bytes));
        }
        let files = items.iter().map(|(k, _)| self.path_of(k)).collect();
        self.store.put_all(items)?;
        Ok(Published {
            start: start.to_string(),
            end: end.to_string(),
            files,
            rows,
        })
    }

    /// Writes one object whole (dead letters, merged files).
    pub fn put(&self, key: &str, bytes: Vec<u8>) -> Result<PathBuf, IngestError> {
        self.store.put_all(vec![(key.to_string(), bytes)])?;
        Ok(self.path_of(key))
    }

    pub fn remove(&self, path: &Path) -> Result<(), IngestError> {
        Ok(self.store.delete(&self.key_of(path))?)
    }

    /// Every published Parquet file, in path order.
    pub fn files(&self) -> Result<Vec<PathBuf>, IngestError> {
        Ok(self
            .store
            .list(USAGE)?
            .into_iter()
            .filter(|k| k.ends_with(PARQUET))
            .map(|k| self.path_of(&k))
            .collect())
    }

    /// Every dead letter, in path order.
    pub fn dead_letters(&self) -> Result<Vec<PathBuf>, IngestError> {
        Ok(self
            .store
            .list(DEAD_LETTERS)?
            .into_iter()
            .map(|k| self.path_of(&k))
            .collect())
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
            let Some(part) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(PartName::parse)
            else {
                continue;
            };
            if part.source != source {
                continue;
            }
            batches
                .entry((part.start, part.end))
                .or_insert((part.parts, Vec::new()))
                .1
                .push(path);
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
                self.remove(p)?;
            }
        }
        self.store
            .remove_temporaries(USAGE, &PartName::prefix_of(source))?;
        Ok(complete)
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

    fn bytes(&self, path: &Path) -> Result<Bytes, IngestError> {
        Ok(self.store.get(&self.key_of(path))?)
    }

    /// Reads every event in the lake (tests, checks and small lakes).
    pub fn read_events(&self) -> Result<Vec<UsageEvent>, IngestError> {
        let mut out = Vec::new();
        for f in self.files()? {
            out.extend(self.read_file(&f)?);
        }
        Ok(out)
    }

    /// Calls `each` with every event of the hours that end after `since`,
    /// one file at a time; returns how many (budgets rebuilt from the
    /// ledger read the current period this way).
    pub fn each_event_since(
        &self,
        since: DateTime<Utc>,
        mut each: impl FnMut(&UsageEvent),
    ) -> Result<usize, IngestError> {
        let mut n = 0;
        for f in self.files()? {
            let hour = layout::hour_of(&self.key_of(&f));
            if hour.is_some_and(|(_, start)| layout::hour_end(start) <= since) {
                continue;
            }
            for e in self.read_file(&f)? {
                each(&e);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Reads one lake file back into events.
    pub fn read_file(&self, path: &Path) -> Result<Vec<UsageEvent>, IngestError> {
        let reader = ParquetRecordBatchReaderBuilder::try_new(self.bytes(path)?)?.build()?;
        let mut out = Vec::new();
        for batch in reader {
            out.extend(columns::from_batch(&batch?)?);
        }
        Ok(out)
    }

    /// Whether a lake file stores `event_id` annotated as a Parquet UUID,
    /// as files written before the annotation was dropped do (Spark 4
    /// cannot read them; compaction rewrites them).
    pub fn has_uuid_annotation(&self, path: &Path) -> Result<bool, IngestError> {
        let builder = ParquetRecordBatchReaderBuilder::try_new(self.bytes(path)?)?;
        let annotated = builder.parquet_schema().columns().iter().any(|c| {
            c.name() == "event_id"
                && matches!(
                    c.logical_type_ref(),
                    Some(parquet::basic::LogicalType::Uuid)
                )
        });
        Ok(annotated)
    }

    /// Reads only the event ids of a lake file.
    pub fn read_event_ids(&self, path: &Path) -> Result<Vec<uuid::Uuid>, IngestError> {
        use arrow_array::cast::AsArray;
        let builder = ParquetRecordBatchReaderBuilder::try_new(self.bytes(path)?)?;
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

    /// A file's key-value metadata entry `key`.
    pub fn file_metadata(&self, path: &Path, key: &str) -> Result<Option<String>, IngestError> {
        let reader = SerializedFileReader::new(self.bytes(path)?)?;
        Ok(reader
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| {
                kv.iter()
                    .find(|k| k.key == key)
                    .and_then(|k| k.value.clone())
            }))
    }
}
