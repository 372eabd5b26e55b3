//! Firing once: before an alert is recorded or sent, its key is claimed.
//! The first claim wins; every other process (or this one after a
//! restart) finds the key taken and stays quiet. Claims live in Redis when
//! one is configured (`SET NX`), and always in the lake (an object created
//! only if absent), so every process sharing the lake agrees, and a Redis
//! that lost its data (a restart without persistence, an eviction, a new
//! instance) does not send an alert twice: the lake's claim decides. A
//! claim holds the winning alert's id, so a process that crashed after
//! claiming knows the claim is its own when it retries.
//!
//! [`Records`] keeps the alerts themselves in the lake
//! (`alerts/records/date=YYYY-MM-DD/<id>.json`), for the `alerts` table
//! and `GET /v1/alerts`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tollgate_lake::store::Store;

use super::alert::Alert;

/// Where claims are kept: always the lake, and Redis in front of it when
/// one is configured.
#[derive(Clone)]
pub struct Claims {
    lake: Arc<Store>,
    redis: Option<Arc<RedisClaims>>,
}

struct RedisClaims {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
    /// Key prefix, e.g. `tollgate:alert:`.
    prefix: String,
    timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("redis: {0}")]
    Redis(String),
    #[error("lake: {0}")]
    Lake(String),
}

/// How long a claim outlives its alert: past any budget period.
const CLAIM_TTL_S: u64 = 400 * 24 * 3600;

const CLAIMS: &str = "alerts/claims";
const RECORDS: &str = "alerts/records";

impl RedisClaims {
    async fn conn(&self) -> Result<redis::aio::ConnectionManager, ClaimError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let c = tokio::time::timeout(
            self.timeout * 2,
            redis::aio::ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| ClaimError::Redis("connect timed out".into()))?
        .map_err(|e| ClaimError::Redis(e.to_string()))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// One command on `key` (prefixed): `SET NX GET`, `GET`, `SET`, `DEL`.
    async fn run<T: redis::FromRedisValue>(
        &self,
        key: &str,
        command: &str,
        args: &[&str],
    ) -> Result<T, ClaimError> {
        let mut c = self.conn().await?;
        redis::cmd(command)
            .arg(format!("{}{key}", self.prefix))
            .arg(args)
            .query_async(&mut c)
            .await
            .map_err(|e| ClaimError::Redis(e.to_string()))
    }
}

fn lake_err(e: impl std::fmt::Display) -> ClaimError {
    ClaimError::Lake(e.to_string())
}

impl Claims {
    /// Claims in the lake only.
    pub fn lake(lake: Arc<Store>) -> Claims {
        Claims { lake, redis: None }
    }

    /// Claims in Redis at `url` (keys under `prefix`) in front of `lake`.
    pub fn redis(
        url: &str,
        prefix: &str,
        timeout: Duration,
        lake: Arc<Store>,
    ) -> Result<Claims, ClaimError> {
        let client = redis::Client::open(url).map_err(|e| ClaimError::Redis(e.to_string()))?;
        Ok(Claims {
            lake,
            redis: Some(Arc::new(RedisClaims {
                client,
                conn: tokio::sync::Mutex::new(None),
                prefix: format!("{prefix}alert:"),
                timeout,
            })),
        })
    }

    pub fn describe(&self) -> &'static str {
        if self.redis.is_some() {
            "redis and lake"
        } else {
            "lake"
        }
    }

    fn object(key: &str) -> String {
        format!("{CLAIMS}/{}", hex::encode(Sha256::digest(key.as_bytes())))
    }

    /// Claims `key` for `id`: `Ok(None)` when it is now (or already was)
    /// `id`'s, `Ok(Some(holder))` when another alert holds it.
    pub async fn claim(&self, key: &str, id: &str) -> Result<Option<String>, ClaimError> {
        let ttl = CLAIM_TTL_S.to_string();
        if let Some(r) = &self.redis {
            let set: Option<String> = r.run(key, "SET", &[id, "NX", "EX", &ttl, "GET"]).await?;
            if let Some(holder) = set.filter(|holder| holder != id) {
                return Ok(Some(holder));
            }
        }
        // The lake has the last word; a holder found there is written back
        // to Redis for the other processes.
        let (store, object, mine) = (self.lake.clone(), Self::object(key), id.to_string());
        let holder = tokio::task::spawn_blocking(move || {
            if store.create(&object, mine.clone().into_bytes())? {
                return Ok(None);
            }
            let holder = store.read(&object)?.unwrap_or_default();
            let holder = String::from_utf8_lossy(&holder).into_owned();
            Ok(Some(holder).filter(|h| *h != mine))
        })
        .await
        .map_err(lake_err)?
        .map_err(|e: tollgate_lake::LakeError| lake_err(e))?;
        if let (Some(r), Some(h)) = (&self.redis, &holder) {
            r.run::<()>(key, "SET", &[h, "EX", &ttl]).await?;
        }
        Ok(holder)
    }

    /// Who holds `key`, if anyone.
    pub async fn holder(&self, key: &str) -> Result<Option<String>, ClaimError> {
        if let Some(r) = &self.redis
            && let Some(h) = r.run::<Option<String>>(key, "GET", &[]).await?
        {
            return Ok(Some(h));
        }
        let (store, object) = (self.lake.clone(), Self::object(key));
        tokio::task::spawn_blocking(move || store.read(&object))
            .await
            .map_err(lake_err)?
            .map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned()))
            .map_err(lake_err)
    }

    /// Lets `key` be claimed again (an episode that ended).
    pub async fn release(&self, key: &str) -> Result<(), ClaimError> {
        let (store, object) = (self.lake.clone(), Self::object(key));
        tokio::task::spawn_blocking(move || store.delete(&object))
            .await
            .map_err(lake_err)?
            .map_err(lake_err)?;
        if let Some(r) = &self.redis {
            r.run::<()>(key, "DEL", &[]).await?;
        }
        Ok(())
    }
}

/// The alerts in the lake, read incrementally: each record is fetched
/// once, then served from memory.
#[derive(Clone)]
pub struct Records {
    store: Arc<Store>,
    seen: Arc<Mutex<BTreeMap<String, Arc<Alert>>>>,
}

impl Records {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            seen: Arc::default(),
        }
    }

    fn key(a: &Alert) -> String {
        format!(
            "{RECORDS}/date={}/{}.json",
            a.fired_at.format("%Y-%m-%d"),
            a.id
        )
    }

    /// Stores `alert` (again, harmlessly, after a crash).
    pub async fn put(&self, alert: &Alert) -> Result<(), ClaimError> {
        let bytes = serde_json::to_vec(alert).map_err(|e| ClaimError::Lake(e.to_string()))?;
        let key = Self::key(alert);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.put_all(vec![(key, bytes)]))
            .await
            .map_err(|e| ClaimError::Lake(e.to_string()))?
            .map_err(|e| ClaimError::Lake(e.to_string()))
    }

    /// Every recorded alert, oldest first.
    pub async fn all(&self) -> Result<Vec<Arc<Alert>>, ClaimError> {
        let (store, seen) = (self.store.clone(), self.seen.clone());
        tokio::task::spawn_blocking(move || {
            let keys = store.list(RECORDS)?;
            let known: Vec<String> = {
                let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                keys.iter()
                    .filter(|k| !seen.contains_key(*k))
                    .cloned()
                    .collect()
            };
            let mut fresh = Vec::with_capacity(known.len());
            for k in known {
                let Some(bytes) = store.read(&k)? else {
                    continue;
                };
                match serde_json::from_slice::<Alert>(&bytes) {
                    Ok(a) => fresh.push((k, Arc::new(a))),
                    Err(e) => tracing::warn!(key = %k, error = %e, "an alert record that is not an alert; skipped"),
                }
            }
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.extend(fresh);
            seen.retain(|k, _| keys.binary_search(k).is_ok());
            let mut all: Vec<Arc<Alert>> = seen.values().cloned().collect();
            all.sort_by(|a, b| (a.fired_at, &a.id).cmp(&(b.fired_at, &b.id)));
            Ok(all)
        })
        .await
        .map_err(|e| ClaimError::Lake(e.to_string()))?
        .map_err(|e: tollgate_lake::LakeError| ClaimError::Lake(e.to_string()))
    }
}
