//! Embedded mode: the gateway's own spool straight into the lake, in the
//! gateway's process, with the same publish rules as the Kafka ingester.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tollgate_spool::{Position, SpoolReader};

use crate::decode::decode;
use tollgate_lake::layout::clean_source;

use crate::lake::Lake;
use crate::{IngestError, IngestOptions, Stats, dead_letter};

/// Drains `reader` into `lake` until `stop` is set and the spool's writer
/// is closed and drained, or `stop` is set and `drain_deadline` passes
/// (what is left stays in the spool for the next start).
pub fn run(
    lake: &Lake,
    mut reader: SpoolReader,
    instance: &str,
    opts: &IngestOptions,
    stop: &AtomicBool,
    drain_for: Duration,
    stats: &Stats,
) -> Result<(), IngestError> {
    let source = format!("spool.{}", clean_source(instance));
    resume(lake, &mut reader, &source)?;

    let mut events = Vec::new();
    let mut start = reader.position();
    let mut first_at: Option<Instant> = None;
    let mut stop_at: Option<Instant> = None;
    let mut retry = Retry::default();
    loop {
        if stop_at.is_none() && stop.load(Ordering::Acquire) {
            stop_at = Some(Instant::now() + drain_for);
        }
        let out_of_time = stop_at.is_some_and(|t| Instant::now() >= t);
        let wait = match first_at {
            Some(t) => opts.flush_interval.saturating_sub(t.elapsed()),
            None => Duration::from_millis(100),
        }
        .min(Duration::from_millis(100));
        let room = opts.flush_rows.saturating_sub(events.len()).max(1);
        let batch = if out_of_time {
            Default::default()
        } else {
            reader.next_batch(room, wait)?
        };
        let mut refused = None;
        for (i, raw) in batch.records().enumerate() {
            match decode(raw, opts.max_event_bytes) {
                Ok(e) => events.push(e),
                Err(rejection) => {
                    let origin = dead_letter::Origin {
                        source: &source,
                        partition: None,
                        position: format!("{}+{i}", batch.start),
                    };
                    match dead_letter::write(lake, &origin, raw, &rejection.reason) {
                        Ok(_) => {
                            stats.dead_letters.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            refused = Some(e);
                            break;
                        }
                    }
                }
            }
        }
        if let Some(e) = refused {
            retry.failed(&e, &mut reader, stop_at, stats);
            events.clear();
            first_at = None;
            continue;
        }
        if !batch.is_empty() {
            first_at.get_or_insert_with(Instant::now);
        }
        let end = reader.position();
        let stopping = stop_at.is_some();
        let due = first_at.is_some_and(|t| t.elapsed() >= opts.flush_interval)
            || events.len() >= opts.flush_rows
            || (stopping && (reader.finished() || out_of_time));
        if due && end > start {
            let published = publish(
                lake,
                &mut reader,
                &source,
                start,
                end,
                std::mem::take(&mut events),
                stats,
            );
            first_at = None;
            match published {
                Ok(()) => {
                    start = end;
                    retry.succeeded();
                }
                // The range is still in the spool: read it again and retry.
                Err(e) => {
                    retry.failed(&e, &mut reader, stop_at, stats);
                    continue;
                }
            }
        }
        if stopping && (reader.finished() || out_of_time) && end == start {
            if out_of_time && !reader.finished() {
                tracing::warn!(at = %reader.position(), "drain time is up; the rest stays in the spool for the next start");
            }
            return Ok(());
        }
    }
}

/// A lake that cannot be written (a full disk, an object store down, a
/// directory replaced) stops nothing: the undrained range stays in the
/// spool, is read again and published once the lake takes it, with the
/// pause doubling from 200 ms to 10 s. Logged at the first failure and
/// every doubling of the count; counted in `Stats::publish_failures`.
#[derive(Default)]
struct Retry {
    failures: u64,
}

impl Retry {
    fn failed(
        &mut self,
        e: &IngestError,
        reader: &mut SpoolReader,
        stop_at: Option<Instant>,
        stats: &Stats,
    ) {
        self.failures += 1;
        stats.publish_failures.fetch_add(1, Ordering::Relaxed);
        if self.failures.is_power_of_two() {
            tracing::error!(failures = self.failures, error = %e, "cannot write the lake; the events wait in the spool and are retried");
        }
        reader.rewind();
        let pause = Duration::from_millis(200)
            .saturating_mul(1 << self.failures.min(6))
            .min(Duration::from_secs(10));
        let pause = match stop_at {
            Some(t) => pause.min(t.saturating_duration_since(Instant::now())),
            None => pause,
        };
        std::thread::sleep(pause);
    }

    fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "the lake takes writes again");
            self.failures = 0;
        }
    }
}

fn publish(
    lake: &Lake,
    reader: &mut SpoolReader,
    source: &str,
    start: Position,
    end: Position,
    events: Vec<tollgate_schemas::UsageEvent>,
    stats: &Stats,
) -> Result<(), IngestError> {
    if !events.is_empty() {
        stats.published(&lake.publish(source, &name(start), &name(end), events)?);
    }
    // Only after the files are in place: a crash before this line is
    // caught by `resume`, which finds the published range.
    reader.ack(end)?;
    Ok(())
}

/// Skips what the lake already holds: a crash between publishing and
/// saving the spool cursor must not publish the range again.
fn resume(lake: &Lake, reader: &mut SpoolReader, source: &str) -> Result<(), IngestError> {
    let published = lake
        .recover_source(source)?
        .into_iter()
        .filter_map(|(_, end)| end.parse::<Position>().ok())
        .max();
    if let Some(end) = published.filter(|&end| end > reader.position()) {
        tracing::info!(from = %reader.position(), to = %end, "the lake already holds this spool range; skipping it");
        reader.skip_to(end);
        reader.ack(end)?;
    }
    Ok(())
}

/// A spool position in a file name: zero-padded so names order as text.
fn name(p: Position) -> String {
    format!("{:020}.{:020}", p.segment, p.offset)
}
