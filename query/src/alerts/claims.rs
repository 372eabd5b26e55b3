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

/// Where claims are kept.
#[derive(Clone)]
pub enum Claims {
    Redis {
        /// Boxed: the client is large, the lake variant small.
        client: Box<redis::Client>,
        conn: Arc<tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>>,
        prefix: String,
        timeout: Duration,
        lake: Arc<Store>,
    },
    Lake(Arc<Store>),
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

impl Claims {
    /// Claims in Redis at `url`, keys under `prefix`, backed by `lake`.
    pub fn redis(
        url: &str,
        prefix: &str,
        timeout: Duration,
        lake: Arc<Store>,
    ) -> Result<Claims, ClaimError> {
        let client = redis::Client::open(url).map_err(|e| ClaimError::Redis(e.to_string()))?;
        Ok(Claims::Redis {
            client: Box::new(client),
            conn: Arc::new(tokio::sync::Mutex::new(None)),
            prefix: format!("{prefix}alert:"),
            timeout,
            lake,
        })
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Claims::Redis { .. } => "redis",
            Claims::Lake(_) => "lake",
        }
    }

    async fn conn(
        client: &redis::Client,
        slot: &tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
        timeout: Duration,
    ) -> Result<redis::aio::ConnectionManager, ClaimError> {
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let c = tokio::time::timeout(
            timeout * 2,
            redis::aio::ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| ClaimError::Redis("connect timed out".into()))?
        .map_err(|e| ClaimError::Redis(e.to_string()))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    fn object(key: &str) -> String {
        format!("{CLAIMS}/{}", hex::encode(Sha256::digest(key.as_bytes())))
    }

    /// Claims `key` for `id`: `Ok(None)` when it is now (or already was)
    /// `id`'s, `Ok(Some(holder))` when another alert holds it.
    pub async fn claim(&self, key: &str, id: &str) -> Result<Option<String>, ClaimError> {
        match self {
            Claims::Redis {
                client,
                conn,
                prefix,
                timeout,
                lake,
            } => {
                let mut c = Self::conn(client, conn, *timeout).await?;
                let k = format!("{prefix}{key}");
                let set: Option<String> = redis::cmd("SET")
                    .arg(&k)
                    .arg(id)
                    .arg("NX")
                    .arg("EX")
                    .arg(CLAIM_TTL_S)
                    .arg("GET")
                    .query_async(&mut c)
                    .await
                    .map_err(|e| ClaimError::Redis(e.to_string()))?;
                if let Some(holder) = set.filter(|holder| holder != id) {
                    return Ok(Some(holder));
                }
                // Won in Redis: the lake has the last word, and a holder
                // found there is written back for the other processes.
                let holder = Self::lake_claim(lake, key, id).await?;
                if let Some(h) = &holder {
                    redis::cmd("SET")
                        .arg(&k)
                        .arg(h)
                        .arg("EX")
                        .arg(CLAIM_TTL_S)
                        .query_async::<()>(&mut c)
                        .await
                        .map_err(|e| ClaimError::Redis(e.to_string()))?;
                }
                Ok(holder)
            }
            Claims::Lake(store) => Self::lake_claim(store, key, id).await,
        }
    }

    async fn lake_claim(
        store: &Arc<Store>,
        key: &str,
        id: &str,
    ) -> Result<Option<String>, ClaimError> {
        let (store, object, id) = (store.clone(), Self::object(key), id.to_string());
        tokio::task::spawn_blocking(move || {
            if store.create(&object, id.clone().into_bytes())? {
                return Ok(None);
            }
            let holder = store.read(&object)?.unwrap_or_default();
            let holder = String::from_utf8_lossy(&holder).into_owned();
            Ok(Some(holder).filter(|h| *h != id))
        })
        .await
        .map_err(|e| ClaimError::Lake(e.to_string()))?
        .map_err(|e: tollgate_lake::LakeError| ClaimError::Lake(e.to_string()))
    }

    async fn lake_holder(store: &Arc<Store>, key: &str) -> Result<Option<String>, ClaimError> {
        let (store, object) = (store.clone(), Self::object(key));
        tokio::task::spawn_blocking(move || store.read(&object))
            .await
            .map_err(|e| ClaimError::Lake(e.to_string()))?
            .map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned()))
            .map_err(|e| ClaimError::Lake(e.to_string()))
    }

    async fn lake_release(store: &Arc<Store>, key: &str) -> Result<(), ClaimError> {
        let (store, object) = (store.clone(), Self::object(key));
        tokio::task::spawn_blocking(move || store.delete(&object))
            .await
            .map_err(|e| ClaimError::Lake(e.to_string()))?
            .map_err(|e| ClaimError::Lake(e.to_string()))
    }

    /// Who holds `key`, if anyone.
    pub async fn holder(&self, key: &str) -> Result<Option<String>, ClaimError> {
        match self {
            Claims::Redis {
                client,
                conn,
                prefix,
                timeout,
                lake,
            } => {
                let mut c = Self::conn(client, conn, *timeout).await?;
                let held: Option<String> = redis::cmd("GET")
                    .arg(format!("{prefix}{key}"))
                    .query_async(&mut c)
                    .await
                    .map_err(|e| ClaimError::Redis(e.to_string()))?;
                match held {
                    Some(h) => Ok(Some(h)),
                    None => Self::lake_holder(lake, key).await,
                }
            }
            Claims::Lake(store) => Self::lake_holder(store, key).await,
        }
    }

    /// Lets `key` be claimed again (an episode that ended).
    pub async fn release(&self, key: &str) -> Result<(), ClaimError> {
        match self {
            Claims::Redis {
                client,
                conn,
                prefix,
                timeout,
                lake,
            } => {
                Self::lake_release(lake, key).await?;
                let mut c = Self::conn(client, conn, *timeout).await?;
                redis::cmd("DEL")
                    .arg(format!("{prefix}{key}"))
                    .query_async::<()>(&mut c)
                    .await
                    .map_err(|e| ClaimError::Redis(e.to_string()))
            }
            Claims::Lake(store) => Self::lake_release(store, key).await,
        }
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
