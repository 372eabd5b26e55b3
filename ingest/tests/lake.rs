//! The lake's publish rules: lossless round trip, one file per hour, dedupe
//! by event id, and recovery of an interrupted publish.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use tollgate_ingest::Lake;
use tollgate_ingest::lake::row_order;
use tollgate_ingest::synth::Synth;
use tollgate_lake::PartName;
use tollgate_schemas::UsageEvent;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-lake-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn events(n: usize, gap_us: u64) -> Vec<UsageEvent> {
    let start: DateTime<Utc> = "2026-03-01T09:58:00Z".parse().unwrap();
    let mut synth = Synth::new(7, start, gap_us).unwrap();
    (0..n).map(|_| synth.next_event()).collect()
}

fn sorted(mut v: Vec<UsageEvent>) -> Vec<UsageEvent> {
    v.sort_by_key(|e| e.event_id);
    v
}

#[test]
fn events_round_trip_through_parquet_exactly() {
    let lake = Lake::open(scratch("roundtrip")).unwrap();
    let sent = events(2000, 150_000); // ~5 minutes: crosses 10:00
    let published = lake.publish("t.0", "0", "2000", sent.clone()).unwrap();
    assert_eq!(published.rows, 2000);
    assert_eq!(published.files.len(), 2, "one file per hour touched");
    assert!(
        published.files[0]
            .to_str()
            .unwrap()
            .contains("date=2026-03-01/hour=09/")
    );
    assert!(
        published.files[1]
            .to_str()
            .unwrap()
            .contains("hour=10/t.0~0~2000~1of2.parquet")
    );
    assert_eq!(sorted(lake.read_events().unwrap()), sorted(sent));
    // Rows inside a file are in the lake's row order.
    let first = lake.read_file(&published.files[0]).unwrap();
    assert!(first.windows(2).all(|w| row_order(&w[0], &w[1]).is_lt()));
    assert_ne!(first[0].consumer, first[first.len() - 1].consumer);
}

#[test]
fn money_round_trips_to_its_limit_and_is_never_narrowed_past_it() {
    use std::str::FromStr;
    use tollgate_schemas::Usd;
    let lake = Lake::open(scratch("money")).unwrap();
    let mut sent = events(2, 1);
    sent[0].cost_usd = Some(Usd::from_str("99999999.9999999999").unwrap());
    sent[1].cost_saved_usd = Some(Usd::from_str("0.0000000001").unwrap());
    lake.publish("m.0", "0", "2", sent.clone()).unwrap();
    assert_eq!(sorted(lake.read_events().unwrap()), sorted(sent));

    let mut over = events(1, 1);
    over[0].cost_usd = Some(Usd::from_str("100000000").unwrap());
    assert!(lake.publish("m.1", "0", "1", over).is_err());
}

#[test]
fn duplicates_in_a_batch_are_published_once() {
    let lake = Lake::open(scratch("dedupe")).unwrap();
    let mut sent = events(100, 1000);
    let replayed = sent[10..40].to_vec();
    sent.extend(replayed);
    let published = lake.publish("t.0", "0", "130", sent).unwrap();
    assert_eq!(published.rows, 100);
    assert_eq!(lake.read_events().unwrap().len(), 100);
}

#[test]
fn an_interrupted_publish_is_rolled_back_on_recovery() {
    let lake = Lake::open(scratch("recover")).unwrap();
    lake.publish("t.0", "0", "2000", events(2000, 150_000))
        .unwrap();
    lake.publish("t.1", "0", "10", events(10, 1000)).unwrap();
    let second = lake
        .publish("t.0", "2000", "4000", events(2000, 150_000))
        .unwrap();
    // A crash after the first part of the second batch was renamed: its
    // other part never made it, and a temporary file is left behind.
    std::fs::remove_file(&second.files[1]).unwrap();
    let tmp_dir = second.files[1].parent().unwrap();
    std::fs::write(tmp_dir.join(".t.0~4000~5000~0of1.parquet.tmp"), b"partial").unwrap();

    let complete = lake.recover_source("t.0").unwrap();
    assert_eq!(complete, vec![("0".to_string(), "2000".to_string())]);
    assert!(
        !second.files[0].exists(),
        "the incomplete batch's parts are removed"
    );
    assert!(!tmp_dir.join(".t.0~4000~5000~0of1.parquet.tmp").exists());
    // Another source is left alone.
    assert_eq!(lake.recover_source("t.1").unwrap().len(), 1);
    assert_eq!(lake.read_events().unwrap().len(), 2010);
}

#[test]
fn only_the_last_batch_of_a_source_counts_as_cut_short() {
    let lake = Lake::open(scratch("compacted")).unwrap();
    let first = lake
        .publish("t.0", "0000", "2000", events(2000, 150_000))
        .unwrap();
    lake.publish("t.0", "2000", "2100", events(100, 1000))
        .unwrap();
    // Compaction merged the first batch's closed hour away.
    std::fs::remove_file(&first.files[0]).unwrap();
    let complete = lake.recover_source("t.0").unwrap();
    assert_eq!(
        complete.len(),
        2,
        "an earlier batch with parts gone was compacted"
    );
    assert!(first.files[1].exists(), "and its remaining part is kept");
}

#[test]
fn part_names_parse_back() {
    let name = PartName {
        source: "tollgate.usage.v1.3".into(),
        start: "00000000000000000100".into(),
        end: "00000000000000000200".into(),
        part: 1,
        parts: 3,
    };
    assert_eq!(PartName::parse(&name.file_name()), Some(name));
    assert_eq!(PartName::parse("x.parquet"), None);
}

#[test]
#[ignore = "measurement"]
fn bytes_per_event() {
    let lake = Lake::open(scratch("size")).unwrap();
    let p = lake
        .publish("t.0", "0", "1", events(200_000, 18_000))
        .unwrap();
    let bytes: u64 = p
        .files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    let file = std::fs::File::open(&p.files[0]).unwrap();
    let meta = parquet::file::serialized_reader::SerializedFileReader::new(file).unwrap();
    use parquet::file::reader::FileReader;
    let rg = meta.metadata().row_group(0);
    let mut cols: Vec<_> = rg
        .columns()
        .iter()
        .map(|c| (c.compressed_size(), c.column_path().string()))
        .collect();
    cols.sort();
    cols.reverse();
    for (size, name) in cols.iter().take(20) {
        println!(
            "{name:<40} {:.2} B/row",
            *size as f64 / rg.num_rows() as f64
        );
    }
    println!(
        "files {} rows {} bytes/event {:.1}",
        p.files.len(),
        p.rows,
        bytes as f64 / p.rows as f64
    );
}

#[test]
fn compaction_merges_closed_hours_once_and_finishes_an_interrupted_run() {
    use tollgate_ingest::compact::compact;
    let lake = Lake::open(scratch("compact")).unwrap();
    let all = events(3000, 200_000); // ~10 minutes of 2026-03-01 09:58..
    let mut sent = Vec::new();
    for (i, chunk) in all.chunks(300).enumerate() {
        let (start, end) = (format!("{:06}", i * 300), format!("{:06}", i * 300 + 300));
        lake.publish("t.0", &start, &end, chunk.to_vec()).unwrap();
        sent.extend_from_slice(chunk);
    }
    let before = lake.files().unwrap().len();
    let now: DateTime<Utc> = "2026-03-02T00:00:00Z".parse().unwrap();
    let report = compact(&lake, None, now, |_, _, _| {}).unwrap();
    let after = lake.files().unwrap();
    assert!(after.len() < before, "{before} -> {}", after.len());
    assert_eq!(report.files_out, 2, "{report:?}");
    assert_eq!(sorted(lake.read_events().unwrap()), sorted(sent.clone()));
    // A merged file is in the lake's row order and named for its time span.
    for merged in after
        .iter()
        .filter(|p| p.to_str().unwrap().contains("compacted-"))
    {
        let rows = lake.read_file(merged).unwrap();
        assert!(rows.windows(2).all(|w| row_order(&w[0], &w[1]).is_lt()));
        let micros = rows.iter().map(|e| e.ts_start.timestamp_micros());
        let span = format!(
            "compacted-{}-{}-",
            micros.clone().min().unwrap(),
            micros.max().unwrap()
        );
        assert!(
            merged.to_str().unwrap().contains(&span),
            "{merged:?} for {span}"
        );
    }
    // The last batch of the source stays as published.
    assert!(
        after
            .iter()
            .any(|p| p.to_str().unwrap().contains("t.0~002700~003000"))
    );
    assert_eq!(
        lake.recover_source("t.0").unwrap().last().unwrap().1,
        "003000"
    );

    // Idempotent: nothing left to merge.
    let again = compact(&lake, None, now, |_, _, _| {}).unwrap();
    assert_eq!((again.files_in, again.files_out), (0, 0));

    // A run cut short after the rename: the inputs are still there.
    let merged = after
        .iter()
        .find(|p| p.to_str().unwrap().contains("compacted-"))
        .unwrap()
        .clone();
    let resurrected = merged
        .parent()
        .unwrap()
        .join("t.0~000000~000300~0of1.parquet");
    lake.publish("t.0", "000000", "000300", all[..300].to_vec())
        .unwrap();
    assert!(resurrected.exists());
    let report = compact(&lake, None, now, |_, _, _| {}).unwrap();
    assert_eq!(report.finished_interrupted, 1, "{report:?}");
    assert!(!resurrected.exists());
    assert_eq!(sorted(lake.read_events().unwrap()), sorted(sent));

    // Open hours are left alone.
    let early: DateTime<Utc> = "2026-03-01T10:05:00Z".parse().unwrap();
    assert_eq!(compact(&lake, None, early, |_, _, _| {}).unwrap().hours, 0);
}

#[test]
fn files_with_the_uuid_annotation_are_read_and_compaction_rewrites_them_without_it() {
    use arrow_array::RecordBatch;
    use arrow_schema::{Field, Schema};
    use parquet::arrow::ArrowWriter;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use std::sync::Arc;
    use tollgate_ingest::compact::compact;

    let lake = Lake::open(scratch("annotated")).unwrap();
    // A first batch in hour 09, then a later one (the source's last batch,
    // which compaction leaves to the ingester).
    let all = events(600, 10_000_000); // 10 s apart: 09:58 to 11:38
    let sent = all.clone();
    let first_hour = |e: &UsageEvent| e.ts_start.format("%H").to_string() == "09";
    let n = all.iter().take_while(|e| first_hour(e)).count();
    assert!(n > 0 && all[n..].iter().all(|e| !first_hour(e)));
    let published = lake.publish("t.0", "0", "1", all[..n].to_vec()).unwrap();
    lake.publish("t.0", "1", "2", all[n..].to_vec()).unwrap();
    assert_eq!(published.files.len(), 1);
    let file = &published.files[0];
    assert!(
        !lake.has_uuid_annotation(file).unwrap(),
        "new files are plain 16 bytes"
    );

    // The same file as written before: event_id tagged as Arrow's UUID,
    // which the Parquet writer stores as a UUID annotation.
    let bytes = bytes::Bytes::from(std::fs::read(file).unwrap());
    let batches: Vec<RecordBatch> = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .unwrap()
        .build()
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let old = batches[0].schema();
    let fields: Vec<Field> = old
        .fields()
        .iter()
        .map(|f| {
            let f = f.as_ref().clone();
            if f.name() == "event_id" {
                f.with_metadata([("ARROW:extension:name".into(), "arrow.uuid".into())].into())
            } else {
                f
            }
        })
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, schema.clone(), None).unwrap();
    for b in &batches {
        writer
            .write(&RecordBatch::try_new(schema.clone(), b.columns().to_vec()).unwrap())
            .unwrap();
    }
    writer.close().unwrap();
    std::fs::write(file, out).unwrap();
    assert!(lake.has_uuid_annotation(file).unwrap());
    assert_eq!(sorted(lake.read_events().unwrap()), sorted(sent.clone()));

    let now: DateTime<Utc> = "2026-03-02T00:00:00Z".parse().unwrap();
    let report = compact(&lake, None, now, |_, _, _| {}).unwrap();
    assert_eq!((report.files_out, report.rows), (1, n), "{report:?}");
    for f in lake.files().unwrap() {
        assert!(!lake.has_uuid_annotation(&f).unwrap(), "{f:?}");
    }
    assert_eq!(sorted(lake.read_events().unwrap()), sorted(sent));
    // Once rewritten, the hour is left alone.
    assert_eq!(
        compact(&lake, None, now, |_, _, _| {}).unwrap().files_out,
        0
    );
}
