//! The semantic cache's index: for each partition (scope, endpoint, model,
//! sampling parameters and the conversation before the last user message),
//! the unit vectors of the texts whose answers are stored, each pointing
//! at its entry's exact key.
//!
//! A flat index, scanned in full: every lookup is exact (no recall lost
//! to an approximate graph), expired and evicted rows leave at once (TTLs
//! need deletion, which HNSW graphs such as `hnsw_rs` do not offer), and
//! there is nothing to build. Redis 7 as Debian ships it has no vector
//! search (that is the RediSearch module), so the index lives in process
//! beside whichever store holds the entries. The scan is a dot product
//! over contiguous `f32` rows that the compiler vectorises; partitions
//! keep typical scans short, and scans past [`BLOCKING_SCAN`] floats run
//! on the blocking pool so that no request thread waits on them. Lookup
//! time at 100,000 entries is in BENCHMARKS.md.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::upstream::read::read_all;
use crate::upstream::{Endpoint, SendError, Upstream};

/// Floats scanned (rows times dimensions) past which a lookup runs on the
/// blocking pool.
pub const BLOCKING_SCAN: usize = 1 << 20;

/// Longest embeddings answer read, bytes.
const MAX_EMBEDDING_BYTES: usize = 8 << 20;

/// The index of every semantic route, bounded in rows.
pub struct Index {
    inner: RwLock<Inner>,
    max_rows: usize,
}

#[derive(Default)]
struct Inner {
    partitions: HashMap<String, Partition>,
    /// Rows by age, for eviction: (partition, row id).
    order: VecDeque<(String, u64)>,
    rows: usize,
    next_id: u64,
}

struct Partition {
    dims: usize,
    /// Row-major unit vectors.
    vectors: Vec<f32>,
    ids: Vec<u64>,
    keys: Vec<String>,
    expires: Vec<Instant>,
}

/// The nearest live row at or above the threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Nearest {
    pub key: String,
    pub similarity: f32,
}

impl Index {
    pub fn new(max_rows: usize) -> Self {
        Self {
            inner: RwLock::default(),
            max_rows: max_rows.max(1),
        }
    }

    /// Rows held now.
    pub fn len(&self) -> usize {
        self.inner.read().map_or(0, |i| i.rows)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `vector` (a unit vector) for the entry at `key`, evicting the
    /// oldest rows past the bound; a vector of other dimensions than the
    /// partition's replaces the partition (its embedding model changed).
    pub fn insert(&self, partition: &str, vector: &[f32], key: String, ttl: Duration) {
        let Ok(mut inner) = self.inner.write() else {
            return;
        };
        let id = inner.next_id;
        inner.next_id += 1;
        let mut dropped = 0;
        let p = inner
            .partitions
            .entry(partition.to_string())
            .or_insert_with(|| Partition::new(vector.len()));
        if p.dims != vector.len() {
            dropped = p.ids.len();
            *p = Partition::new(vector.len());
        }
        p.vectors.extend_from_slice(vector);
        p.ids.push(id);
        p.keys.push(key);
        p.expires.push(Instant::now() + ttl);
        inner.rows = inner.rows + 1 - dropped;
        inner.order.push_back((partition.to_string(), id));
        while inner.rows > self.max_rows {
            let Some((part, old)) = inner.order.pop_front() else {
                break;
            };
            if inner
                .partitions
                .get_mut(&part)
                .is_some_and(|p| p.remove(old))
            {
                inner.rows -= 1;
            }
        }
    }

    /// The nearest live row of `partition` with cosine similarity at
    /// least `threshold` to `vector` (a unit vector). Expired rows met on
    /// the way are removed.
    pub fn nearest(&self, partition: &str, vector: &[f32], threshold: f32) -> Option<Nearest> {
        let now = Instant::now();
        let (best, expired) = {
            let inner = self.inner.read().ok()?;
            let p = inner.partitions.get(partition)?;
            if p.dims != vector.len() {
                return None;
            }
            let mut best: Option<(usize, f32)> = None;
            let mut expired = Vec::new();
            for (row, v) in p.vectors.chunks_exact(p.dims).enumerate() {
                if p.expires[row] <= now {
                    expired.push(p.ids[row]);
                    continue;
                }
                let s = dot(v, vector);
                if s >= threshold && best.is_none_or(|(_, b)| s > b) {
                    best = Some((row, s));
                }
            }
            let best = best.map(|(row, s)| Nearest {
                key: p.keys[row].clone(),
                similarity: s,
            });
            (best, expired)
        };
        if !expired.is_empty()
            && let Ok(mut inner) = self.inner.write()
        {
            let mut removed = 0;
            if let Some(p) = inner.partitions.get_mut(partition) {
                removed = expired.into_iter().filter(|id| p.remove(*id)).count();
            }
            inner.rows -= removed;
        }
        best
    }

    /// Removes the row of `partition` that points at `key` (its entry is
    /// gone from the store: flushed, evicted, expired early).
    pub fn forget(&self, partition: &str, key: &str) {
        let Ok(mut inner) = self.inner.write() else {
            return;
        };
        let removed = inner.partitions.get_mut(partition).is_some_and(|p| {
            let id = p.keys.iter().position(|k| k == key).map(|row| p.ids[row]);
            id.is_some_and(|id| p.remove(id))
        });
        if removed {
            inner.rows -= 1;
        }
    }

    /// Floats a lookup in `partition` scans.
    pub fn scan_size(&self, partition: &str) -> usize {
        self.inner
            .read()
            .ok()
            .and_then(|i| i.partitions.get(partition).map(|p| p.vectors.len()))
            .unwrap_or(0)
    }
}

impl Partition {
    fn new(dims: usize) -> Self {
        Self {
            dims,
            vectors: Vec::new(),
            ids: Vec::new(),
            keys: Vec::new(),
            expires: Vec::new(),
        }
    }

    /// Removes row `id` (the last row takes its place); whether it was here.
    fn remove(&mut self, id: u64) -> bool {
        let Some(row) = self.ids.iter().position(|&i| i == id) else {
            return false;
        };
        let last = self.ids.len() - 1;
        if row != last {
            let (d, src) = (self.dims, last * self.dims);
            self.vectors.copy_within(src..src + d, row * d);
        }
        self.vectors.truncate(last * self.dims);
        self.ids.swap_remove(row);
        self.keys.swap_remove(row);
        self.expires.swap_remove(row);
        true
    }
}

/// The dot product, in eight lanes so that it vectorises.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `v` scaled to unit length; `None` for a zero or non-finite vector.
pub fn unit(mut v: Vec<f32>) -> Option<Vec<f32>> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if !norm.is_finite() || norm <= f32::EPSILON {
        return None;
    }
    v.iter_mut().for_each(|x| *x /= norm);
    Some(v)
}

/// The text a semantic lookup embeds: the last user message (its string
/// content, or its text parts joined by newlines), or a completion's
/// string prompt; with the position of that message.
pub fn query_text(body: &Map<String, Value>) -> Option<(Option<usize>, String)> {
    if let Some(Value::Array(messages)) = body.get("messages") {
        let (at, m) = messages
            .iter()
            .enumerate()
            .rev()
            .find(|(_, m)| m["role"] == "user")?;
        let text = match &m["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => {
                let texts: Vec<&str> = parts.iter().filter_map(|p| p["text"].as_str()).collect();
                texts.join("\n")
            }
            _ => return None,
        };
        return (!text.trim().is_empty()).then_some((Some(at), text));
    }
    match body.get("prompt") {
        Some(Value::String(p)) if !p.trim().is_empty() => Some((None, p.clone())),
        _ => None,
    }
}

/// The body without the text embedded: what a semantic hit must share
/// exactly. The message `at` keeps everything but its text (images,
/// audio, files, its name), so questions about different images never
/// share an answer.
pub fn context(body: &Map<String, Value>, at: Option<usize>) -> Map<String, Value> {
    let mut rest = body.clone();
    match (at, rest.get_mut("messages")) {
        (Some(i), Some(Value::Array(messages))) if i < messages.len() => {
            if let Some(m) = messages[i].as_object_mut() {
                let kept = match m.remove("content") {
                    Some(Value::Array(parts)) => parts
                        .into_iter()
                        .filter(|p| {
                            !p.is_string() && p.get("type").and_then(Value::as_str) != Some("text")
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                if !kept.is_empty() {
                    m.insert("content".into(), Value::Array(kept));
                }
            }
        }
        _ => {
            rest.remove("prompt");
        }
    }
    rest
}

/// An OpenAI-compatible embeddings upstream.
pub struct Embedder {
    pub upstream: Arc<Upstream>,
    pub model: String,
    pub timeout: Duration,
}

impl Embedder {
    /// Asks for the embedding of `body` (`{"model", "input"}`): the status
    /// and the whole answer, or why there is none, within the timeout.
    pub async fn ask(&self, body: Bytes) -> Result<(u16, Bytes), String> {
        let ask = async {
            let resp = self
                .upstream
                .send(Endpoint::Embeddings, body, &[])
                .await
                .map_err(|e| match e {
                    SendError::Connect(m) | SendError::Timeout(m) | SendError::Other(m) => m,
                })?;
            let status = resp.status;
            let bytes = read_all(resp.body, MAX_EMBEDDING_BYTES, self.timeout)
                .await
                .map_err(|_| "the embeddings answer broke or was too large".to_string())?;
            Ok((status, bytes))
        };
        match tokio::time::timeout(self.timeout, ask).await {
            Err(_) => Err(format!(
                "no embedding within {} ms",
                self.timeout.as_millis()
            )),
            Ok(r) => r,
        }
    }

    /// The request body for `text`.
    pub fn body(&self, text: &str) -> Bytes {
        Bytes::from(json!({"model": self.model, "input": text}).to_string())
    }
}

/// The unit vector of an embeddings answer (`data[0].embedding`).
pub fn vector_of(bytes: &[u8]) -> Result<Vec<f32>, String> {
    let doc: Value =
        serde_json::from_slice(bytes).map_err(|_| "the embeddings answer is not JSON")?;
    let v: Vec<f32> = doc["data"][0]["embedding"]
        .as_array()
        .ok_or("the embeddings answer has no data[0].embedding")?
        .iter()
        .map(|x| x.as_f64().map(|f| f as f32))
        .collect::<Option<_>>()
        .ok_or("the embedding holds a non-number")?;
    unit(v).ok_or_else(|| "the embedding is a zero vector".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(x: &[f32]) -> Vec<f32> {
        unit(x.to_vec()).unwrap()
    }

    #[test]
    fn the_nearest_row_above_the_threshold_wins_within_its_partition() {
        let i = Index::new(10);
        let ttl = Duration::from_secs(60);
        i.insert("p", &v(&[1.0, 0.0, 0.0]), "a".into(), ttl);
        i.insert("p", &v(&[0.8, 0.6, 0.0]), "b".into(), ttl);
        i.insert("q", &v(&[0.0, 1.0, 0.0]), "c".into(), ttl);
        let near = i.nearest("p", &v(&[0.9, 0.5, 0.0]), 0.9).unwrap();
        assert_eq!(near.key, "b");
        assert!(near.similarity > 0.99);
        assert_eq!(i.nearest("p", &v(&[0.0, 0.0, 1.0]), 0.5), None);
        assert_eq!(i.nearest("p", &v(&[0.0, 1.0, 0.0]), 0.9), None, "c is in q");
        assert_eq!(
            i.nearest("p", &v(&[1.0, 0.0]), 0.1),
            None,
            "other dimensions"
        );
    }

    #[test]
    fn rows_are_evicted_oldest_first_and_expired_rows_leave() {
        let i = Index::new(2);
        let ttl = Duration::from_secs(60);
        i.insert("p", &v(&[1.0, 0.0]), "a".into(), ttl);
        i.insert("p", &v(&[0.0, 1.0]), "b".into(), ttl);
        i.insert("p", &v(&[-1.0, 0.0]), "c".into(), ttl);
        assert_eq!(i.len(), 2);
        assert_eq!(i.nearest("p", &v(&[1.0, 0.0]), 0.9), None, "a was evicted");
        assert_eq!(i.nearest("p", &v(&[0.0, 1.0]), 0.9).unwrap().key, "b");
        i.insert("p", &v(&[0.7, 0.7]), "d".into(), Duration::ZERO);
        assert_eq!(i.len(), 2, "b made room for d");
        assert_eq!(i.nearest("p", &v(&[0.7, 0.7]), 0.99), None);
        assert_eq!(i.len(), 1, "the expired row left on the scan");
        assert_eq!(i.nearest("p", &v(&[-1.0, 0.0]), 0.9).unwrap().key, "c");
    }

    #[test]
    fn an_embeddings_answer_gives_its_unit_vector_or_why_not() {
        let v = vector_of(br#"{"data":[{"embedding":[3.0,4.0]}]}"#).unwrap();
        assert_eq!(v, vec![0.6, 0.8]);
        assert!(vector_of(b"<html>").is_err());
        assert!(vector_of(br#"{"data":[]}"#).is_err());
        assert!(vector_of(br#"{"data":[{"embedding":[0,0]}]}"#).is_err());
        assert!(vector_of(br#"{"data":[{"embedding":["x"]}]}"#).is_err());
    }

    #[test]
    fn the_dot_product_matches_the_plain_sum() {
        let a: Vec<f32> = (0..37).map(|x| x as f32 * 0.1).collect();
        let b: Vec<f32> = (0..37).map(|x| 1.0 - x as f32 * 0.01).collect();
        let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - plain).abs() < 1e-3);
    }

    #[test]
    fn the_query_is_the_last_user_message_and_the_context_the_rest() {
        let body: Map<String, Value> = serde_json::from_value(json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "how"}, {"type": "text", "text": "much?"}]},
            ],
        }))
        .unwrap();
        let (at, text) = query_text(&body).unwrap();
        assert_eq!((at, text.as_str()), (Some(3), "how\nmuch?"));
        let rest = context(&body, at);
        assert_eq!(rest["messages"][3], json!({"role": "user"}));
        let with_image: Map<String, Value> = serde_json::from_value(json!({
            "messages": [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": "cat.png"}}]}],
        }))
        .unwrap();
        let rest = context(&with_image, Some(0));
        assert_eq!(
            rest["messages"][0]["content"][0]["image_url"]["url"],
            "cat.png"
        );
    }
}
