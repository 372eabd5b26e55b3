//! Counters shared by several gateways through Redis.
//!
//! An admission is one `EVALSHA` of [`super::scripts::ADMIT`]: every counter the request
//! lands in is checked and, only if none would go over, reserved, in one
//! atomic step and one round trip. Settlements are not on the request
//! path: they are summed per counter and bucket in memory and a task sends
//! the sums every [`FLUSH_EVERY`] (one `EVALSHA` of [`super::scripts::SETTLE`] per 64
//! counters, pipelined), so Redis sees a few commands per interval, not
//! several per request. When Redis is unreachable the gateway admits with
//! its local counters (logged once per outage, counted in `/metrics`) and
//! the sums wait, bounded, to be merged into Redis when it is back.
//!
//! How a counter is kept in Redis, and the scripts that keep it, are in
//! [`super::scripts`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::encoding::DescriptorEncoder;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use rustc_hash::FxHashMap;
use tollgate_schemas::metrics::{Collector, counter, gauge};

use super::local::{Figures, Over, Take};
use super::scripts::Scripts;
use crate::config::limits::RedisConfig;

/// How often a gateway says it is alive, and looks for gateways that are
/// not; one silent for [`ALIVE_FOR`] has its reservations released.
const HEARTBEAT: Duration = Duration::from_secs(5);
const ALIVE_FOR: Duration = Duration::from_secs(30);

/// How long settlements are summed before they are sent: a reservation
/// stays counted at most this much longer than its request.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Counter buckets with settlements waiting (while Redis is away, say);
/// past it a new one is dropped and counted (its counter then over-counts
/// by the reservation until its window passes, never under-counts).
const BACKLOG: usize = 100_000;
/// Counters per `EVALSHA` of the settlement script.
const PER_CALL: usize = 64;

/// One change to a counter's bucket: a settlement (actual minus reserved,
/// and minus reserved) or, after local admission, what to merge.
#[derive(Debug, Clone)]
pub struct Op {
    pub key: Arc<str>,
    pub bucket: i64,
    /// The oldest bucket still in the window when the op was made.
    pub from: i64,
    pub used: i64,
    pub reserved: i64,
    pub keep_ms: i64,
}

/// Figures for `/metrics`.
#[derive(Default)]
pub struct SharedStats {
    pub up: AtomicU64,
    pub errors: AtomicU64,
    pub local_admissions: AtomicU64,
    pub dropped: AtomicU64,
    pub backlog: AtomicU64,
    pub merged: AtomicU64,
}

/// The settlements of one counter bucket, summed.
#[derive(Debug, Clone, Copy)]
struct Sum {
    from: i64,
    used: i64,
    reserved: i64,
    keep_ms: i64,
}

type Pending = FxHashMap<(Arc<str>, i64), Sum>;

/// A budget's spend from the ledger: on every (re)connect the counter in
/// Redis is raised to at least it (so a Redis that lost its data, or was
/// away when this gateway started, gets it back); the ledger is read again
/// right after, see [`Shared::reconnected`].
#[derive(Debug, Clone)]
pub struct Seed {
    pub key: String,
    pub bucket: i64,
    pub from: i64,
    /// 10^-10 USD.
    pub used: i64,
    pub keep_ms: i64,
    /// The period's end: a seed is stale past it.
    pub until: chrono::DateTime<chrono::Utc>,
}

pub struct Shared {
    prefix: String,
    /// This gateway's reservations in Redis, and the key that says it is
    /// alive (see [`super::scripts::JANITOR`]).
    lease: String,
    alive: String,
    timeout: Duration,
    conn: RwLock<Option<ConnectionManager>>,
    up: AtomicBool,
    /// Whether an outage was logged (so one at start is, too).
    told: AtomicBool,
    scripts: Arc<Scripts>,
    pending: Arc<Mutex<Pending>>,
    seeds: Mutex<Vec<Seed>>,
    /// A seed came since the last (re)connect: set it at the next flush.
    reseed: AtomicBool,
    /// Budgets' ledger spend is known (or there are no budgets): until
    /// then the shared counters are not used, so that no request is
    /// admitted against a budget Redis lost.
    ready: AtomicBool,
    /// Told each time Redis comes back: budgets are then reconciled with
    /// the ledger at once rather than at the next interval.
    pub reconnected: Arc<tokio::sync::Notify>,
    pub stats: Arc<SharedStats>,
}

/// Redis failed or took too long.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SharedError(String);

impl Shared {
    /// Starts the connection and the settlement task on the current Tokio
    /// runtime; an unreachable Redis is retried in the background. With
    /// `seeded_later`, the shared counters wait for [`Shared::seeded`].
    pub fn start(config: &RedisConfig, seeded_later: bool) -> Result<Arc<Self>, SharedError> {
        let client = redis::Client::open(config.url.expose())
            .map_err(|_| SharedError("redis.url is not a usable Redis URL".into()))?;
        let scripts = Arc::new(Scripts::default());
        let instance = format!("{:016x}", fastrand::u64(..));
        let shared = Arc::new(Self {
            prefix: config.prefix.clone(),
            lease: format!("{}:lease:{instance}", config.prefix),
            alive: format!("{}:alive:{instance}", config.prefix),
            timeout: config.timeout,
            conn: RwLock::new(None),
            up: AtomicBool::new(false),
            told: AtomicBool::new(false),
            scripts: scripts.clone(),
            pending: Arc::default(),
            seeds: Mutex::default(),
            reseed: AtomicBool::new(false),
            ready: AtomicBool::new(!seeded_later),
            reconnected: Arc::default(),
            stats: Arc::default(),
        });
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| SharedError("[redis] needs a Tokio runtime".into()))?;
        handle.spawn(flush(
            Arc::downgrade(&shared),
            client,
            config.timeout,
            scripts,
        ));
        Ok(shared)
    }

    /// The Redis key of one counter.
    pub fn key(&self, rule: &str, unit: &str, span: &str, value: &str) -> String {
        format!("{}:quota:{rule}:{unit}:{span}:{value}", self.prefix)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn connection(&self) -> Option<ConnectionManager> {
        self.conn.read().ok()?.clone()
    }

    async fn call<T: redis::FromRedisValue>(
        &self,
        call: redis::ScriptInvocation<'_>,
        timeout: Duration,
    ) -> Result<T, SharedError> {
        let Some(mut conn) = self.connection() else {
            return Err(SharedError("not connected".into()));
        };
        match tokio::time::timeout(timeout, call.invoke_async(&mut conn)).await {
            Ok(Ok(r)) => Ok(r),
            // Redis answered, with an error: it is there; this request
            // goes on with the local counters.
            Ok(Err(e))
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
                    || e.kind() == redis::ErrorKind::Extension =>
            {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "a limits script failed");
                Err(SharedError(e.to_string()))
            }
            Ok(Err(e)) => Err(self.failed(&e.to_string())),
            Err(_) => Err(self.failed("no answer in time")),
        }
    }

    /// One atomic check-and-reserve over `takes` (keyed by `keys`).
    pub async fn admit(
        &self,
        keys: &[String],
        takes: &[Take<'_>],
        keep_ms: &[i64],
    ) -> Result<Result<Vec<Figures>, Over>, SharedError> {
        let mut call = self.scripts.admit.prepare_invoke();
        for k in keys {
            call.key(k);
        }
        call.key(&self.lease);
        for (t, keep) in takes.iter().zip(keep_ms) {
            call.arg(t.frame.current)
                .arg(t.frame.oldest_live)
                .arg(t.ceiling)
                .arg(t.amount)
                .arg(if t.enforce { 1 } else { 0 })
                .arg(*keep);
        }
        let reply: Vec<i64> = self.call(call, self.timeout).await?;
        match reply.as_slice() {
            [0, rest @ ..] if rest.len() == 3 * takes.len() => Ok(Ok(figures(rest))),
            [i, frees] if *i >= 1 => Ok(Err(Over {
                index: (*i - 1) as usize,
                frees_at: (*frees >= 0).then_some(*frees),
            })),
            _ => Err(self.failed("unexpected answer from the admission script")),
        }
    }

    /// Reads counters (for `/v1/limits`): each key's figures with `from`
    /// its oldest live bucket.
    pub async fn read(&self, keys: &[(String, i64)]) -> Result<Vec<Figures>, SharedError> {
        let mut call = self.scripts.read.prepare_invoke();
        for (k, from) in keys {
            call.key(k);
            call.arg(*from);
        }
        let reply: Vec<i64> = self.call(call, self.timeout * 4).await?;
        if reply.len() != 3 * keys.len() {
            return Err(self.failed("unexpected answer from the read script"));
        }
        Ok(figures(&reply))
    }

    /// Every budget's ledger spend is given: the shared counters may be used.
    pub fn seeded(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Keeps a budget's ledger spend to set in Redis on every (re)connect.
    pub fn seed(&self, seed: Seed) {
        if let Ok(mut seeds) = self.seeds.lock() {
            seeds.retain(|s| s.key != seed.key);
            seeds.push(seed);
        }
        self.reseed.store(true, Ordering::Relaxed);
    }

    /// Adds one request's settlement to the sums the flusher sends.
    pub fn send(&self, ops: Vec<Op>) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        for op in ops {
            let slot = (op.key, op.bucket);
            if pending.len() >= BACKLOG && !pending.contains_key(&slot) {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let sum = pending.entry(slot).or_insert(Sum {
                from: op.from,
                used: 0,
                reserved: 0,
                keep_ms: op.keep_ms,
            });
            sum.from = sum.from.max(op.from);
            sum.used += op.used;
            sum.reserved += op.reserved;
            sum.keep_ms = sum.keep_ms.max(op.keep_ms);
        }
    }

    /// Marks Redis as away (logged once per outage, and at start).
    fn failed(&self, why: &str) -> SharedError {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let was_up = self.up.swap(false, Ordering::Relaxed);
        if was_up || !self.told.swap(true, Ordering::Relaxed) {
            self.stats.up.store(0, Ordering::Relaxed);
            tracing::warn!(
                error = why,
                "Redis is unreachable: limits go on with this gateway's local counters"
            );
        }
        SharedError(why.to_string())
    }

    fn back(&self, merged: usize) {
        self.told.store(false, Ordering::Relaxed);
        if !self.up.swap(true, Ordering::Relaxed) {
            self.stats.up.store(1, Ordering::Relaxed);
            self.reconnected.notify_one();
            tracing::info!(
                merged,
                "Redis is reachable: limits use the shared counters again"
            );
        }
    }
}

/// Says this gateway is alive, and releases the reservations of any gateway
/// whose alive key has expired (it stopped without settling them).
async fn heartbeat(
    shared: &Shared,
    scripts: &Scripts,
    c: &mut ConnectionManager,
) -> redis::RedisResult<()> {
    redis::cmd("SET")
        .arg(&shared.alive)
        .arg(1)
        .arg("PX")
        .arg(ALIVE_FOR.as_millis() as u64)
        .query_async::<()>(c)
        .await?;
    let pattern = format!("{}:lease:*", shared.prefix);
    let mut cursor: u64 = 0;
    loop {
        let (next, leases): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(c)
            .await?;
        for lease in leases.iter().filter(|l| **l != shared.lease) {
            let Some(instance) = lease.rsplit(':').next() else {
                continue;
            };
            let alive = format!("{}:alive:{instance}", shared.prefix);
            let released: i64 = scripts
                .janitor
                .key(lease)
                .key(&alive)
                .invoke_async(c)
                .await?;
            if released == 1 {
                tracing::warn!(
                    lease = lease.as_str(),
                    "released the reservations of a gateway that stopped without settling them"
                );
            }
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

fn figures(flat: &[i64]) -> Vec<Figures> {
    flat.chunks(3)
        .map(|c| Figures {
            used: c[0],
            reserved: c[1],
            newest: (c[2] >= 0).then_some(c[2]),
        })
        .collect()
}

/// The settlement task: connects (and reconnects), sends the summed
/// settlements every [`FLUSH_EVERY`], keeps them while Redis is away and
/// merges them when it is back. Ends when the gateway drops its [`Shared`].
async fn flush(
    shared: std::sync::Weak<Shared>,
    client: redis::Client,
    timeout: Duration,
    scripts: Arc<Scripts>,
) {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout.max(Duration::from_millis(500))))
        .set_response_timeout(Some(timeout.max(Duration::from_millis(500))))
        .set_number_of_retries(1);
    let mut conn: Option<ConnectionManager> = None;
    let mut retry: Option<(u64, Pending)> = None;
    let mut beat: Option<std::time::Instant> = None;
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if !shared.ready.load(Ordering::Relaxed) {
            continue;
        }
        if conn.is_none() {
            let connect = ConnectionManager::new_with_config(client.clone(), config.clone());
            let connected =
                tokio::time::timeout(timeout.max(Duration::from_secs(2)), connect).await;
            let connected = connected.unwrap_or_else(|_| {
                Err(redis::RedisError::from(std::io::Error::from(
                    std::io::ErrorKind::TimedOut,
                )))
            });
            match connected {
                Ok(c) => {
                    if let Ok(mut slot) = shared.conn.write() {
                        *slot = Some(c.clone());
                    }
                    conn = Some(c);
                }
                Err(e) => {
                    shared.failed(&e.to_string());
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let merging = !shared.is_up();
        let reseed = shared.reseed.swap(false, Ordering::Relaxed);
        if merging || reseed {
            // (Re)load the scripts: a restarted Redis has none, and the
            // pipelined settlements call them by hash.
            let mut load = redis::pipe();
            for code in &scripts.code {
                load.cmd("SCRIPT").arg("LOAD").arg(code).ignore();
            }
            let now = chrono::Utc::now();
            let seeds: Vec<Seed> = (shared.seeds.lock().map(|s| s.clone()))
                .unwrap_or_default()
                .into_iter()
                .filter(|s| s.until > now)
                .collect();
            for s in &seeds {
                load.cmd("EVALSHA")
                    .arg(scripts.seed.get_hash())
                    .arg(1)
                    .arg(&s.key)
                    .arg(s.bucket)
                    .arg(s.from)
                    .arg(s.used)
                    .arg(s.keep_ms)
                    .ignore();
            }
            let loaded = tokio::time::timeout(timeout * 4, load.query_async::<()>(c)).await;
            if !matches!(loaded, Ok(Ok(()))) {
                shared.reseed.store(true, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        }
        if beat.is_none_or(|at| at.elapsed() >= HEARTBEAT) {
            beat = Some(std::time::Instant::now());
            let alive = tokio::time::timeout(timeout * 4, heartbeat(&shared, &scripts, c)).await;
            if !matches!(alive, Ok(Ok(()))) {
                beat = None;
            }
        }
        // A batch whose sending broke is sent again as it was, under the
        // same id, before anything newer: Redis applies it at most once.
        let (id, batch) = match retry.take() {
            Some(unsent) => unsent,
            None => match shared.pending.lock() {
                Ok(mut p) if !p.is_empty() => (fastrand::u64(..), std::mem::take(&mut *p)),
                _ => (0, Pending::default()),
            },
        };
        let sent = batch.len();
        if sent > 0 {
            let entries: Vec<_> = batch.iter().collect();
            let mut pipe = redis::pipe();
            for (n, chunk) in entries.chunks(PER_CALL).enumerate() {
                let cmd = pipe
                    .cmd("EVALSHA")
                    .arg(scripts.settle.get_hash())
                    .arg(chunk.len() + 2);
                for ((key, _), _) in chunk {
                    cmd.arg(&**key);
                }
                cmd.arg(&shared.lease);
                cmd.arg(format!("{}:settled:{id:016x}:{n}", shared.prefix));
                for ((_, bucket), sum) in chunk {
                    cmd.arg(*bucket)
                        .arg(sum.from)
                        .arg(sum.used)
                        .arg(sum.reserved)
                        .arg(sum.keep_ms);
                }
                cmd.ignore();
            }
            let result = tokio::time::timeout(timeout * 20, pipe.query_async::<()>(c)).await;
            let failed = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("settlements got no answer in time".to_string()),
            };
            if let Some(why) = failed {
                shared.failed(&why);
                retry = Some((id, batch));
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        }
        let waiting =
            shared.pending.lock().map_or(0, |p| p.len()) + retry.as_ref().map_or(0, |r| r.1.len());
        shared
            .stats
            .backlog
            .store(waiting as u64, Ordering::Relaxed);
        if merging {
            shared
                .stats
                .merged
                .fetch_add(sent as u64, Ordering::Relaxed);
        }
        shared.back(sent);
    }
}

impl std::fmt::Debug for SharedStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedStats")
    }
}

impl Collector for SharedStats {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(
            &mut e,
            "tollgate_limits_redis_up",
            "Whether the shared limit counters in Redis are in use (0: local counters).",
            &self.up,
        )?;
        counter(
            &mut e,
            "tollgate_limits_redis_errors",
            "Redis calls of the limits that failed or timed out.",
            &self.errors,
        )?;
        counter(
            &mut e,
            "tollgate_limits_local_admissions",
            "Requests admitted with local counters while Redis was away.",
            &self.local_admissions,
        )?;
        counter(
            &mut e,
            "tollgate_limits_settlements_dropped",
            "Settlements dropped: too many counters waiting for Redis.",
            &self.dropped,
        )?;
        counter(
            &mut e,
            "tollgate_limits_settlements_merged",
            "Counter buckets merged into Redis after an outage.",
            &self.merged,
        )?;
        gauge(
            &mut e,
            "tollgate_limits_settlements_backlog",
            "Counter buckets with settlements waiting for Redis.",
            &self.backlog,
        )
    }
}
