//! Messages that are not usage events, kept with the reason and where they
//! came from, so ingestion goes on and nothing disappears unexplained.
//!
//! One JSON object per message under `dead_letters/date=YYYY-MM-DD/`, named
//! by source and position, so a replay overwrites instead of duplicating.

use std::path::PathBuf;

use base64::Engine;
use chrono::Utc;

use crate::IngestError;
use tollgate_lake::layout::dead_letter_key;

use crate::lake::Lake;

/// Where a message came from.
#[derive(Debug, Clone)]
pub struct Origin<'a> {
    /// `<topic>.<partition>` or `spool.<instance>`.
    pub source: &'a str,
    pub partition: Option<i32>,
    /// Kafka offset, or the spool position of the batch plus the index.
    pub position: String,
}

pub fn write(
    lake: &Lake,
    origin: &Origin<'_>,
    raw: &[u8],
    reason: &str,
) -> Result<PathBuf, IngestError> {
    let now = Utc::now();
    let body = serde_json::json!({
        "reason": reason,
        "source": origin.source,
        "partition": origin.partition,
        "position": origin.position,
        "received_at": now.to_rfc3339(),
        "bytes": raw.len(),
        "raw_base64": base64::engine::general_purpose::STANDARD.encode(raw),
    });
    let key = dead_letter_key(now, origin.source, &origin.position);
    let text = serde_json::to_vec_pretty(&body).map_err(|e| IngestError::Store(e.to_string()))?;
    let path = lake.put(&key, text)?;
    tracing::warn!(source = origin.source, position = %origin.position, reason, "message sent to dead letters");
    Ok(path)
}
