//! The response cache: an answer stored once and replayed to the requests
//! that ask the same thing, at no upstream cost.
//!
//! Entries live in Redis when the config has `[redis]` (shared by every
//! gateway, each with its TTL), else in a bounded in-process store
//! (`quick_cache`, weighed by bytes). A lookup that fails or takes longer
//! than `[cache] lookup_timeout_ms` bypasses the cache (counted), never
//! errs or stalls; stores run off the request path, bounded, each drop
//! counted.
//!
//! Its parts, in the order a request meets them: [`key`] (scope, model
//! and the canonical request), this module's [`Cache`] (lookup and store),
//! [`entry`] (what is stored and how it is replayed, whole or as a
//! stream), [`semantic`] (the embeddings upstream and the vector index of
//! semantic routes) and [`fill`] (a streamed miss folded into an entry).

pub mod entry;
pub mod fill;
pub mod key;
pub mod semantic;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Semaphore;
use tollgate_schemas::CacheKind;

use crate::config::limits::RedisConfig;
use crate::config::{CacheSettings, RouteConfig};
use crate::observe::metrics::{CacheStore, Lookup};
use crate::upstream::Upstream;
use entry::Entry;
use semantic::{BLOCKING_SCAN, Embedder, Index, Nearest};

/// Redis stores in flight at once; past it a store is dropped (counted).
const MAX_PENDING_STORES: usize = 256;

pub struct Cache {
    memory: Option<Memory>,
    /// Semantic routes' vectors, pointing at exact keys.
    index: Arc<Index>,
    /// Each semantic route's embeddings upstream, by route model.
    embedders: HashMap<String, Embedder>,
    redis: Option<Arc<Redis>>,
    lookup_timeout: Duration,
    stores_in_flight: Arc<Semaphore>,
    lookups: Family<Lookup, Counter>,
    stores: Family<CacheStore, Counter>,
}

type Memory = quick_cache::sync::Cache<String, Arc<Memo>, Weigh>;

/// An in-process entry and when it expires.
struct Memo {
    entry: Arc<Entry>,
    expires: Instant,
    bytes: u64,
}

#[derive(Clone)]
struct Weigh;

impl quick_cache::Weighter<String, Arc<Memo>> for Weigh {
    fn weight(&self, key: &String, memo: &Arc<Memo>) -> u64 {
        key.len() as u64 + memo.bytes
    }
}

struct Redis {
    conn: RwLock<Option<ConnectionManager>>,
    prefix: String,
    /// After a failed or slow call, Redis is left alone until then (ms
    /// since `epoch`): requests bypass at once instead of each waiting out
    /// the lookup timeout.
    down_until: AtomicU64,
    epoch: Instant,
}

/// How long a failed or slow Redis is left alone.
const REDIS_BACKOFF: Duration = Duration::from_secs(1);

/// What a lookup found.
pub enum Looked {
    Hit(Arc<Entry>),
    Miss,
    /// The store failed or was too slow: the request bypasses the cache.
    Failed,
}

/// What storing an answer needs, decided when the request was looked up.
#[derive(Debug, Clone)]
pub struct Pending {
    pub key: String,
    pub ttl: Duration,
    pub max_entry_bytes: usize,
    pub kind: CacheKind,
    /// Semantic routes: the partition and unit vector the entry is found by.
    pub semantic: Option<(String, Vec<f32>)>,
}

/// The client's `Cache-Control`: `no-cache` looks nothing up (the answer
/// is still stored), `no-store` stores nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    pub no_cache: bool,
    pub no_store: bool,
}

impl Control {
    pub fn of(headers: &HeaderMap) -> Self {
        let mut c = Control::default();
        for v in headers.get_all(axum::http::header::CACHE_CONTROL) {
            for d in v.to_str().unwrap_or("").split(',') {
                match d.trim().to_ascii_lowercase().as_str() {
                    "no-cache" => c.no_cache = true,
                    "no-store" => c.no_store = true,
                    _ => {}
                }
            }
        }
        c
    }
}

/// The cache could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cache: {0}")]
pub struct CacheError(String);

impl Cache {
    /// The store `[redis]` names, else an in-process one of
    /// `settings.memory_bytes`. Redis is connected in the background; until
    /// it answers, lookups bypass.
    pub fn new(
        settings: &CacheSettings,
        redis: Option<&RedisConfig>,
        routes: &[RouteConfig],
        upstreams: &HashMap<String, Arc<Upstream>>,
        lookups: Family<Lookup, Counter>,
        stores: Family<CacheStore, Counter>,
    ) -> Result<Self, CacheError> {
        let mut embedders = HashMap::new();
        for r in routes {
            let Some(e) = r.cache.as_ref().and_then(|c| c.embeddings.as_ref()) else {
                continue;
            };
            let Some(upstream) = upstreams.get(&e.upstream) else {
                return Err(CacheError(format!("no upstream {:?}", e.upstream)));
            };
            let embedder = Embedder {
                upstream: upstream.clone(),
                model: e.model.clone(),
                timeout: e.timeout,
            };
            embedders.insert(r.model.clone(), embedder);
        }
        let (memory, redis) = match redis {
            Some(r) => (None, Some(Redis::start(r)?)),
            None => {
                let items = (settings.memory_bytes / 4096).clamp(64, 1 << 20) as usize;
                let memory = Memory::with_weighter(items, settings.memory_bytes, Weigh);
                (Some(memory), None)
            }
        };
        Ok(Self {
            memory,
            index: Arc::new(Index::new(settings.semantic_entries)),
            embedders,
            redis,
            lookup_timeout: settings.lookup_timeout,
            stores_in_flight: Arc::new(Semaphore::new(MAX_PENDING_STORES)),
            lookups,
            stores,
        })
    }

    /// Counts a lookup's `result` (`hit`, `miss`, `bypass`, `error`).
    pub fn counted(&self, result: &'static str, kind: CacheKind) {
        let kind = match kind {
            CacheKind::Exact => "exact",
            CacheKind::Semantic => "semantic",
        };
        self.lookups.get_or_create(&Lookup { result, kind }).inc();
    }

    fn stored(&self, result: &'static str) {
        self.stores.get_or_create(&CacheStore { result }).inc();
    }

    /// The entry under `key`, within the lookup timeout.
    pub async fn get(&self, key: &str) -> Looked {
        if let Some(m) = &self.memory {
            return match m.get(key) {
                Some(memo) if memo.expires > Instant::now() => Looked::Hit(memo.entry.clone()),
                Some(_) => {
                    m.remove(key);
                    Looked::Miss
                }
                None => Looked::Miss,
            };
        }
        let Some(r) = &self.redis else {
            return Looked::Miss;
        };
        let Some(mut conn) = r.connection().filter(|_| r.is_up()) else {
            return Looked::Failed;
        };
        let mut cmd = redis::cmd("GET");
        cmd.arg(r.key(key));
        let get = cmd.query_async::<Option<Vec<u8>>>(&mut conn);
        match tokio::time::timeout(self.lookup_timeout, get).await {
            Ok(Ok(Some(bytes))) => match serde_json::from_slice::<Entry>(&bytes) {
                Ok(e) => Looked::Hit(Arc::new(e)),
                // Written by another version: a miss, overwritten later.
                Err(_) => Looked::Miss,
            },
            Ok(Ok(None)) => Looked::Miss,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cache lookup failed: Redis left alone for 1 s");
                r.failed();
                Looked::Failed
            }
            Err(_) => {
                tracing::warn!("cache lookup timed out: Redis left alone for 1 s");
                r.failed();
                Looked::Failed
            }
        }
    }

    /// The embeddings upstream of the semantic route `route`.
    pub fn embedder(&self, route: &str) -> Option<&Embedder> {
        self.embedders.get(route)
    }

    /// The exact key of the entry nearest to `vector` in `partition`, at
    /// or above `threshold`; large scans run on the blocking pool.
    pub async fn nearest(
        &self,
        partition: &str,
        vector: &[f32],
        threshold: f32,
    ) -> Option<Nearest> {
        if self.index.scan_size(partition) < BLOCKING_SCAN {
            return self.index.nearest(partition, vector, threshold);
        }
        let (index, partition, vector) =
            (self.index.clone(), partition.to_string(), vector.to_vec());
        tokio::task::spawn_blocking(move || index.nearest(&partition, &vector, threshold))
            .await
            .ok()
            .flatten()
    }

    /// Drops an index row whose entry the store no longer has.
    pub fn forget(&self, partition: &str, key: &str) {
        self.index.forget(partition, key);
    }

    /// Stores `entry` under `pending.key`, off the request path; a
    /// semantic entry joins the index once it is stored.
    pub fn store(self: &Arc<Self>, pending: Pending, entry: Entry) {
        let Ok(bytes) = serde_json::to_vec(&entry) else {
            return self.stored("failed");
        };
        if bytes.len() > pending.max_entry_bytes {
            return self.stored("too_large");
        }
        if let Some(m) = &self.memory {
            let memo = Memo {
                entry: Arc::new(entry),
                expires: Instant::now() + pending.ttl,
                bytes: bytes.len() as u64,
            };
            if let Some((partition, vector)) = &pending.semantic {
                self.index
                    .insert(partition, vector, pending.key.clone(), pending.ttl);
            }
            m.insert(pending.key, Arc::new(memo));
            return self.stored("stored");
        }
        let Some(r) = self.redis.clone() else { return };
        let Ok(permit) = self.stores_in_flight.clone().try_acquire_owned() else {
            return self.stored("dropped");
        };
        let Some(mut conn) = r.connection().filter(|_| r.is_up()) else {
            return self.stored("failed");
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let ttl_ms = pending.ttl.as_millis().max(1) as u64;
            let mut cmd = redis::cmd("SET");
            cmd.arg(r.key(&pending.key))
                .arg(bytes)
                .arg("PX")
                .arg(ttl_ms);
            let set = cmd.query_async::<()>(&mut conn);
            match tokio::time::timeout(Duration::from_secs(2), set).await {
                Ok(Ok(())) => {
                    if let Some((partition, vector)) = &pending.semantic {
                        this.index
                            .insert(partition, vector, pending.key.clone(), pending.ttl);
                    }
                    this.stored("stored");
                }
                Ok(Err(e)) => {
                    // A full Redis (maxmemory, noeviction) refuses with OOM.
                    tracing::debug!(error = %e, "cache store failed");
                    this.stored("failed");
                }
                Err(_) => this.stored("failed"),
            }
        });
    }
}

impl Redis {
    fn start(config: &RedisConfig) -> Result<Arc<Self>, CacheError> {
        let client = redis::Client::open(config.url.expose())
            .map_err(|_| CacheError("redis.url is not a usable Redis URL".into()))?;
        let r = Arc::new(Self {
            conn: RwLock::new(None),
            prefix: config.prefix.clone(),
            down_until: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| CacheError("[redis] needs a Tokio runtime".into()))?;
        handle.spawn(connect(Arc::downgrade(&r), client, config.timeout));
        Ok(r)
    }

    fn key(&self, key: &str) -> String {
        format!("{}:cache:{key}", self.prefix)
    }

    fn connection(&self) -> Option<ConnectionManager> {
        self.conn.read().ok()?.clone()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn is_up(&self) -> bool {
        self.now_ms() >= self.down_until.load(Ordering::Relaxed)
    }

    fn failed(&self) {
        let until = self.now_ms() + REDIS_BACKOFF.as_millis() as u64;
        self.down_until.store(until, Ordering::Relaxed);
    }
}

/// Connects once Redis answers; the connection manager reconnects by
/// itself from then on (failing fast while Redis is away).
async fn connect(r: std::sync::Weak<Redis>, client: redis::Client, timeout: Duration) {
    let t = timeout.max(Duration::from_millis(500));
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(t))
        .set_response_timeout(Some(t))
        .set_number_of_retries(1);
    loop {
        if r.strong_count() == 0 {
            return;
        }
        let made = ConnectionManager::new_with_config(client.clone(), config.clone());
        if let Ok(Ok(c)) = tokio::time::timeout(t * 4, made).await {
            if let Some(r) = r.upgrade()
                && let Ok(mut slot) = r.conn.write()
            {
                *slot = Some(c);
            }
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
