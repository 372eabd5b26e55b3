//! Counters shared by several gateways through Redis.
//!
//! An admission is one `EVALSHA` of [`ADMIT`]: every counter the request
//! lands in is checked and, only if none would go over, reserved, in one
//! atomic step and one round trip. Settlements are not on the request
//! path: they go through a bounded queue to a task that pipelines them.
//! When Redis is unreachable the gateway admits with its local counters
//! (logged once per outage, counted in `/metrics`) and keeps the
//! settlements in a bounded backlog, merged into Redis when it is back.
//!
//! A counter is a hash: field `<bucket>` = used (reservations included),
//! field `r<bucket>` = reserved; buckets that left the window are deleted
//! by the next admission that reads them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::encoding::DescriptorEncoder;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;
use tollgate_schemas::metrics::{Collector, counter, gauge};

use super::local::{Figures, Over, Take};
use crate::config::limits::RedisConfig;

/// Check every counter, then reserve in all or none. KEYS: the counters;
/// ARGV, six per key: bucket now, oldest live bucket, ceiling, amount,
/// enforce (1/0), milliseconds to keep the key. Returns `{0, used,
/// reserved, newest, ...}` per key after the reservation, or `{i, frees}`
/// for the first key that would go over (`frees`: the bucket whose expiry
/// leaves room, -1 if none will).
const ADMIT: &str = r"
local figs = {}
for i = 1, #KEYS do
  local b = (i - 1) * 6
  local from = tonumber(ARGV[b + 2])
  local ceiling = tonumber(ARGV[b + 3])
  local amount = tonumber(ARGV[b + 4])
  local h = redis.call('HGETALL', KEYS[i])
  local used, reserved, newest = 0, 0, -1
  local buckets = {}
  for j = 1, #h, 2 do
    local f = h[j]
    local v = tonumber(h[j + 1]) or 0
    local isr = string.sub(f, 1, 1) == 'r'
    local idx = tonumber(isr and string.sub(f, 2) or f)
    if idx == nil or idx < from then
      redis.call('HDEL', KEYS[i], f)
    elseif isr then
      reserved = reserved + v
    else
      used = used + v
      if v > 0 and idx > newest then newest = idx end
      buckets[#buckets + 1] = {idx, v}
    end
  end
  if ARGV[b + 5] == '1' and used + amount > ceiling then
    local frees = -1
    if amount <= ceiling then
      table.sort(buckets, function(x, y) return x[1] < y[1] end)
      local left = used
      for _, bk in ipairs(buckets) do
        left = left - bk[2]
        if left + amount <= ceiling then frees = bk[1] break end
      end
    end
    return {i, frees}
  end
  figs[i] = {used + amount, reserved + amount, newest}
end
local out = {0}
for i = 1, #KEYS do
  local b = (i - 1) * 6
  local amount = tonumber(ARGV[b + 4])
  local cur = tonumber(ARGV[b + 1])
  redis.call('HINCRBY', KEYS[i], ARGV[b + 1], amount)
  redis.call('HINCRBY', KEYS[i], 'r' .. ARGV[b + 1], amount)
  redis.call('PEXPIRE', KEYS[i], ARGV[b + 6])
  local f = figs[i]
  if amount > 0 and cur > f[3] then f[3] = cur end
  out[#out + 1] = f[1]
  out[#out + 1] = f[2]
  out[#out + 1] = f[3]
end
return out
";

/// Settlements waiting for the flusher; past it they are dropped and
/// counted (the counters then over-count by the reservation until its
/// window passes, never under-count).
const QUEUE: usize = 65_536;
/// Settlements kept while Redis is away, merged when it is back.
const BACKLOG: usize = 200_000;
/// Settlements per pipelined round trip.
const BATCH: usize = 512;

/// One change to a counter's bucket: a settlement (actual minus reserved,
/// and minus reserved) or, after local admission, what to merge.
#[derive(Debug, Clone)]
pub struct Op {
    pub key: Arc<str>,
    pub bucket: i64,
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

pub struct Shared {
    prefix: String,
    timeout: Duration,
    conn: RwLock<Option<ConnectionManager>>,
    up: AtomicBool,
    admit: redis::Script,
    ops: mpsc::Sender<Op>,
    pub stats: Arc<SharedStats>,
}

/// Redis failed or took too long.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SharedError(String);

impl Shared {
    /// Starts the connection and the settlement task on the current Tokio
    /// runtime; an unreachable Redis is retried in the background.
    pub fn start(config: &RedisConfig) -> Result<Arc<Self>, SharedError> {
        let client = redis::Client::open(config.url.expose())
            .map_err(|_| SharedError("redis.url is not a usable Redis URL".into()))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let shared = Arc::new(Self {
            prefix: config.prefix.clone(),
            timeout: config.timeout,
            conn: RwLock::new(None),
            up: AtomicBool::new(false),
            admit: redis::Script::new(ADMIT),
            ops: tx,
            stats: Arc::default(),
        });
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| SharedError("[redis] needs a Tokio runtime".into()))?;
        handle.spawn(flush(Arc::downgrade(&shared), client, rx, config.timeout));
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

    /// One atomic check-and-reserve over `takes` (keyed by `keys`).
    pub async fn admit(
        &self,
        keys: &[String],
        takes: &[Take<'_>],
        keep_ms: &[i64],
    ) -> Result<Result<Vec<Figures>, Over>, SharedError> {
        let Some(mut conn) = self.connection() else {
            return Err(SharedError("not connected".into()));
        };
        let mut call = self.admit.prepare_invoke();
        for ((k, t), keep) in keys.iter().zip(takes).zip(keep_ms) {
            call.key(k);
            call.arg(t.frame.current)
                .arg(t.frame.oldest_live)
                .arg(t.ceiling)
                .arg(t.amount)
                .arg(if t.enforce { 1 } else { 0 })
                .arg(*keep);
        }
        let reply: Vec<i64> =
            match tokio::time::timeout(self.timeout, call.invoke_async(&mut conn)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Err(self.failed(&e.to_string())),
                Err(_) => return Err(self.failed("no answer in time")),
            };
        match reply.as_slice() {
            [0, rest @ ..] if rest.len() == 3 * takes.len() => Ok(Ok(rest
                .chunks(3)
                .map(|c| Figures {
                    used: c[0],
                    reserved: c[1],
                    newest: (c[2] >= 0).then_some(c[2]),
                })
                .collect())),
            [i, frees] if *i >= 1 => Ok(Err(Over {
                index: (*i - 1) as usize,
                frees_at: (*frees >= 0).then_some(*frees),
            })),
            _ => Err(self.failed("unexpected answer from the admission script")),
        }
    }

    /// Reads counters (for `/v1/limits`): each key's figures at `from`
    /// (the oldest live bucket).
    pub async fn read(&self, keys: &[(String, i64)]) -> Result<Vec<Figures>, SharedError> {
        let Some(mut conn) = self.connection() else {
            return Err(SharedError("not connected".into()));
        };
        let mut pipe = redis::pipe();
        for (k, _) in keys {
            pipe.cmd("HGETALL").arg(k);
        }
        let maps: Vec<Vec<(String, i64)>> =
            match tokio::time::timeout(self.timeout * 4, pipe.query_async(&mut conn)).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => return Err(self.failed(&e.to_string())),
                Err(_) => return Err(self.failed("no answer in time")),
            };
        Ok(maps
            .iter()
            .zip(keys)
            .map(|(fields, (_, from))| {
                let mut f = Figures::default();
                for (name, v) in fields {
                    let (reserved, idx) = match name.strip_prefix('r') {
                        Some(rest) => (true, rest.parse::<i64>()),
                        None => (false, name.parse::<i64>()),
                    };
                    let Ok(idx) = idx else { continue };
                    if idx < *from {
                        continue;
                    }
                    if reserved {
                        f.reserved += v;
                    } else {
                        f.used += v;
                        if *v > 0 && f.newest.is_none_or(|n| idx > n) {
                            f.newest = Some(idx);
                        }
                    }
                }
                f
            })
            .collect())
    }

    /// Sets a counter's bucket unless some gateway already has (a budget's
    /// spend rebuilt from the ledger).
    pub async fn seed(&self, key: &str, bucket: i64, used: i64, keep_ms: i64) -> bool {
        let Some(mut conn) = self.connection() else {
            return false;
        };
        let mut pipe = redis::pipe();
        pipe.cmd("HSETNX")
            .arg(key)
            .arg(bucket)
            .arg(used)
            .ignore()
            .cmd("PEXPIRE")
            .arg(key)
            .arg(keep_ms)
            .arg("NX")
            .ignore();
        let sent = tokio::time::timeout(self.timeout * 10, pipe.query_async::<()>(&mut conn));
        matches!(sent.await, Ok(Ok(())))
    }

    /// Queues a settlement without waiting; a full queue drops and counts.
    pub fn send(&self, op: Op) {
        if self.ops.try_send(op).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Marks Redis as away (logged once per outage).
    fn failed(&self, why: &str) -> SharedError {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if self.up.swap(false, Ordering::Relaxed) {
            self.stats.up.store(0, Ordering::Relaxed);
            tracing::warn!(
                error = why,
                "Redis is unreachable: limits go on with this gateway's local counters"
            );
        }
        SharedError(why.to_string())
    }

    fn back(&self, merged: usize) {
        if !self.up.swap(true, Ordering::Relaxed) {
            self.stats.up.store(1, Ordering::Relaxed);
            tracing::info!(
                merged,
                "Redis is reachable: limits use the shared counters again"
            );
        }
    }
}

/// The settlement task: connects (and reconnects), pipelines queued
/// settlements, keeps them while Redis is away and merges them when it is
/// back. Ends when the gateway drops its [`Shared`].
async fn flush(
    shared: std::sync::Weak<Shared>,
    client: redis::Client,
    mut rx: mpsc::Receiver<Op>,
    timeout: Duration,
) {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout.max(Duration::from_millis(500))))
        .set_response_timeout(Some(timeout.max(Duration::from_millis(500))))
        .set_number_of_retries(1);
    let mut backlog: VecDeque<Op> = VecDeque::new();
    let mut conn: Option<ConnectionManager> = None;
    loop {
        let waited = tokio::time::timeout(Duration::from_millis(250), rx.recv()).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match waited {
            Ok(Some(op)) => keep(&mut backlog, op, &shared.stats),
            Ok(None) => return,
            Err(_) => {}
        }
        while let Ok(op) = rx.try_recv() {
            keep(&mut backlog, op, &shared.stats);
        }
        if conn.is_none() {
            match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
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
        if merging {
            let ping = redis::cmd("PING");
            let pong = tokio::time::timeout(timeout * 4, ping.query_async::<()>(c)).await;
            if !matches!(pong, Ok(Ok(()))) {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        }
        let mut sent = 0;
        while !backlog.is_empty() {
            let n = backlog.len().min(BATCH);
            let mut pipe = redis::pipe();
            for op in backlog.iter().take(n) {
                pipe.cmd("HINCRBY")
                    .arg(&*op.key)
                    .arg(op.bucket)
                    .arg(op.used)
                    .ignore();
                if op.reserved != 0 {
                    pipe.cmd("HINCRBY")
                        .arg(&*op.key)
                        .arg(format!("r{}", op.bucket))
                        .arg(op.reserved)
                        .ignore();
                }
                for when in ["NX", "GT"] {
                    pipe.cmd("PEXPIRE")
                        .arg(&*op.key)
                        .arg(op.keep_ms)
                        .arg(when)
                        .ignore();
                }
            }
            match tokio::time::timeout(timeout * 20, pipe.query_async::<()>(c)).await {
                Ok(Ok(())) => {
                    backlog.drain(..n);
                    sent += n;
                }
                Ok(Err(e)) => {
                    shared.failed(&e.to_string());
                    break;
                }
                Err(_) => {
                    shared.failed("settlements got no answer in time");
                    break;
                }
            }
        }
        shared
            .stats
            .backlog
            .store(backlog.len() as u64, Ordering::Relaxed);
        if backlog.is_empty() {
            if merging {
                shared
                    .stats
                    .merged
                    .fetch_add(sent as u64, Ordering::Relaxed);
            }
            shared.back(sent);
        } else {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn keep(backlog: &mut VecDeque<Op>, op: Op, stats: &SharedStats) {
    if backlog.len() >= BACKLOG {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    backlog.push_back(op);
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
            "Settlements dropped: queue or backlog full.",
            &self.dropped,
        )?;
        counter(
            &mut e,
            "tollgate_limits_settlements_merged",
            "Settlements merged into Redis after an outage.",
            &self.merged,
        )?;
        gauge(
            &mut e,
            "tollgate_limits_settlements_backlog",
            "Settlements waiting for Redis.",
            &self.backlog,
        )
    }
}
