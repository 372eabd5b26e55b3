//! Reading a whole upstream body: bounded in bytes, with an idle timeout
//! between chunks, without copying when it comes in one chunk.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use super::BodyStream;

/// Why a body could not be read whole.
pub enum ReadError {
    Timeout,
    Broken(String),
}

/// The whole body, up to `limit` bytes, with at most `idle` between chunks.
pub async fn read_all(
    mut body: BodyStream,
    limit: usize,
    idle: Duration,
) -> Result<Bytes, ReadError> {
    let mut buf = BytesMut::new();
    let mut single: Option<Bytes> = None;
    loop {
        match tokio::time::timeout(idle, body.next()).await {
            Err(_) => return Err(ReadError::Timeout),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ReadError::Broken(e)),
            Ok(Some(Ok(chunk))) => {
                if buf.len() + chunk.len() + single.as_ref().map_or(0, Bytes::len) > limit {
                    return Err(ReadError::Broken(format!(
                        "upstream response exceeds {limit} bytes"
                    )));
                }
                match single.take() {
                    None if buf.is_empty() => single = Some(chunk),
                    None => buf.extend_from_slice(&chunk),
                    Some(first) => {
                        buf.extend_from_slice(&first);
                        buf.extend_from_slice(&chunk);
                    }
                }
            }
        }
    }
    Ok(single.unwrap_or_else(|| buf.freeze()))
}
