//! Getting alerts to the webhooks, and never losing one on the way. An
//! alert is written to the outbox (a directory, one file per alert)
//! before it is claimed, so a crash at any point leaves it to finish on
//! the next start; it leaves the outbox only when every webhook that takes
//! its kind has answered 2xx. A webhook that keeps failing is retried
//! with exponential backoff (1 s doubling to 5 min, jittered) for as long
//! as it takes, its deliveries counted in `/metrics` meanwhile.
//!
//! Each POST carries `x-tollgate-alert-id` (the same on every retry, for
//! the receiver to drop repeats) and, with a `secret`,
//! `x-tollgate-signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`
//! with the `x-tollgate-timestamp` (unix seconds) it was computed over.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::alert::{Alert, Status};
use super::config::{Format, Webhook};
use super::metrics::AlertMetrics;

#[derive(Debug, thiserror::Error)]
#[error("alerts outbox {path}: {message}")]
pub struct OutboxError {
    path: PathBuf,
    message: String,
}

/// An alert on its way, as its outbox file holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub alert: Alert,
    /// Whether its key was claimed for it; until then it may be another
    /// process's to send.
    pub claimed: bool,
    /// The webhooks still to answer, by [`Webhook::id`] (a URL may hold a
    /// credential, so it is not written here).
    pub pending: Vec<String>,
}

struct Attempts {
    backoff: ExponentialBackoff,
    next: Instant,
    failed: u32,
    /// Being sent now: not started again until it answers.
    busy: bool,
}

#[derive(Default)]
struct State {
    entries: BTreeMap<String, Entry>,
    attempts: BTreeMap<(String, String), Attempts>,
}

/// The outbox and the webhooks it delivers to.
#[derive(Clone)]
pub struct Outbox {
    dir: PathBuf,
    webhooks: Arc<Vec<Webhook>>,
    state: Arc<Mutex<State>>,
    client: reqwest::Client,
    metrics: AlertMetrics,
}

fn backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(300))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

impl Outbox {
    /// Opens (creating) the outbox at `dir`; returns the entries a previous
    /// run left unclaimed, for the caller to claim again.
    pub fn open(
        dir: &Path,
        webhooks: Vec<Webhook>,
        metrics: AlertMetrics,
    ) -> Result<(Outbox, Vec<Entry>), OutboxError> {
        let err = |e: &dyn std::fmt::Display| OutboxError {
            path: dir.to_path_buf(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        let client = reqwest::Client::builder()
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| err(&e))?;
        let mut state = State::default();
        let mut unclaimed = Vec::new();
        for f in std::fs::read_dir(dir).map_err(|e| err(&e))? {
            let path = f.map_err(|e| err(&e))?.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|e| err(&e))?;
            match serde_json::from_slice::<Entry>(&bytes) {
                Ok(e) if !e.claimed => unclaimed.push(e),
                Ok(e) => {
                    state.entries.insert(e.alert.id.clone(), e);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "not an alert outbox entry; left alone")
                }
            }
        }
        let outbox = Outbox {
            dir: dir.to_path_buf(),
            webhooks: Arc::new(webhooks),
            state: Arc::new(Mutex::new(state)),
            client,
            metrics,
        };
        outbox.schedule_all();
        Ok((outbox, unclaimed))
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn write(&self, e: &Entry) -> Result<(), OutboxError> {
        let path = self.path(&e.alert.id);
        let err = |m: &dyn std::fmt::Display| OutboxError {
            path: path.clone(),
            message: m.to_string(),
        };
        let bytes = serde_json::to_vec(e).map_err(|m| err(&m))?;
        let tmp = self.dir.join(format!(".{}.tmp", e.alert.id));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(|m| err(&m))?;
            f.write_all(&bytes).map_err(|m| err(&m))?;
            f.sync_all().map_err(|m| err(&m))?;
        }
        std::fs::rename(&tmp, &path).map_err(|m| err(&m))
    }

    fn remove(&self, id: &str) {
        let path = self.path(id);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "could not remove a delivered alert from the outbox");
        }
    }

    /// Keeps `alert` before its claim is tried.
    pub fn stage(&self, alert: &Alert) -> Result<(), OutboxError> {
        self.write(&Entry {
            alert: alert.clone(),
            claimed: false,
            pending: Vec::new(),
        })
    }

    /// The claim was won: deliver `alert` to every webhook taking its kind.
    pub fn claimed(&self, alert: &Alert) -> Result<(), OutboxError> {
        let pending: Vec<String> = (self.webhooks.iter())
            .filter(|w| w.takes(alert.kind))
            .map(Webhook::id)
            .collect();
        if pending.is_empty() {
            self.remove(&alert.id);
            return Ok(());
        }
        let entry = Entry {
            alert: alert.clone(),
            claimed: true,
            pending,
        };
        self.write(&entry)?;
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for url in &entry.pending {
            s.attempts.insert(
                (alert.id.clone(), url.clone()),
                Attempts {
                    backoff: backoff(),
                    next: Instant::now(),
                    failed: 0,
                    busy: false,
                },
            );
        }
        s.entries.insert(alert.id.clone(), entry);
        drop(s);
        self.count_pending();
        Ok(())
    }

    /// Another alert holds the key: this one is not sent.
    pub fn lost(&self, alert: &Alert) {
        self.remove(&alert.id);
    }

    fn schedule_all(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let keys: Vec<(String, String)> = (s.entries.values())
            .flat_map(|e| e.pending.iter().map(|u| (e.alert.id.clone(), u.clone())))
            .collect();
        for k in keys {
            s.attempts.entry(k).or_insert_with(|| Attempts {
                backoff: backoff(),
                next: Instant::now(),
                failed: 0,
                busy: false,
            });
        }
        drop(s);
        self.count_pending();
    }

    fn count_pending(&self) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let failing = s.attempts.values().filter(|a| a.failed > 0).count();
        self.metrics.pending(s.attempts.len(), failing);
    }

    /// Sends what is due, forever; run as a task.
    pub async fn run(self) {
        loop {
            self.deliver_due().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts every due delivery as a task of its own, so a slow or
    /// hanging webhook holds up only its own deliveries.
    async fn deliver_due(&self) {
        let now = Instant::now();
        let due: Vec<(Alert, Webhook)> = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let State { entries, attempts } = &mut *s;
            (attempts.iter_mut())
                .filter(|(_, a)| a.next <= now && !a.busy)
                .filter_map(|((id, hook), a)| {
                    let e = entries.get(id)?;
                    let w = self.webhooks.iter().find(|w| w.id() == *hook)?;
                    a.busy = true;
                    Some((e.alert.clone(), w.clone()))
                })
                .collect()
        };
        for (alert, w) in due {
            let outbox = self.clone();
            tokio::spawn(async move {
                let result = send(&outbox.client, &w, &alert).await;
                outbox.answered(&alert, &w, result);
            });
        }
    }

    fn answered(&self, alert: &Alert, w: &Webhook, result: Result<(), String>) {
        let key = (alert.id.clone(), w.id());
        match result {
            Ok(()) => {
                self.metrics.delivered(true);
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                s.attempts.remove(&key);
                let done = s.entries.get_mut(&alert.id).map(|e| {
                    e.pending.retain(|h| *h != key.1);
                    (e.pending.is_empty(), e.clone())
                });
                match done {
                    Some((true, _)) => {
                        s.entries.remove(&alert.id);
                        drop(s);
                        self.remove(&alert.id);
                    }
                    Some((false, entry)) => {
                        drop(s);
                        if let Err(e) = self.write(&entry) {
                            tracing::warn!(error = %e, "could not save an alert's delivery progress");
                        }
                    }
                    None => {}
                }
            }
            Err(e) => {
                self.metrics.delivered(false);
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(a) = s.attempts.get_mut(&key) {
                    a.busy = false;
                    a.failed = a.failed.saturating_add(1);
                    let wait = a.backoff.next().unwrap_or(Duration::from_secs(300));
                    a.next = Instant::now() + wait;
                    if a.failed.is_power_of_two() {
                        tracing::warn!(webhook = %w.describe(), alert = %alert.id, attempts = a.failed, retry_in_s = wait.as_secs_f64(), error = %e, "alert webhook failed; kept and retried");
                    }
                }
            }
        }
        self.count_pending();
    }
}

/// The body a webhook of `format` gets for `alert`.
pub fn body(format: Format, alert: &Alert) -> Vec<u8> {
    let value = match format {
        Format::Json => serde_json::to_value(alert).unwrap_or_default(),
        Format::Slack => {
            let head = match alert.status {
                Status::Firing => format!("Tollgate {} alert", alert.kind.as_str()),
                Status::Resolved => format!("Tollgate {} alert resolved", alert.kind.as_str()),
            };
            let text = format!("{head}: {}", alert.message);
            serde_json::json!({
                "text": text,
                "blocks": [
                    {"type": "header", "text": {"type": "plain_text", "text": head}},
                    {"type": "section", "text": {"type": "mrkdwn", "text": alert.message}},
                    {"type": "context", "elements": [{
                        "type": "mrkdwn",
                        "text": format!("`{}` · {} · id {}", alert.name, alert.fired_at.to_rfc3339(), alert.id)
                    }]}
                ]
            })
        }
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// `v1=<hex>`: HMAC-SHA256 with `secret` over `"<timestamp>.<body>"`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable_hmac());
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

// HMAC takes a key of any length; this is never reached.
fn unreachable_hmac() -> Hmac<Sha256> {
    <Hmac<Sha256> as Mac>::new_from_slice(b"-").unwrap_or_else(|_| unreachable_hmac())
}

async fn send(client: &reqwest::Client, w: &Webhook, alert: &Alert) -> Result<(), String> {
    let body = body(w.format, alert);
    let now = chrono::Utc::now().timestamp();
    let mut req = client
        .post(&w.url)
        .timeout(w.timeout)
        .header("content-type", "application/json")
        .header("x-tollgate-alert-id", &alert.id)
        .header("x-tollgate-timestamp", now.to_string());
    if let Some(secret) = &w.secret {
        req = req.header(
            "x-tollgate-signature",
            signature(secret.expose(), now, &body),
        );
    }
    // reqwest's errors name the URL, which may hold a credential.
    let resp = req
        .body(body)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", resp.status().as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_over_timestamp_and_body() {
        // What `printf '1700000000.{}' | openssl dgst -sha256 -hmac s3cret` prints.
        assert_eq!(
            signature("s3cret", 1_700_000_000, b"{}"),
            "v1=97926816e98fbb41ccb1673225ff29a2f35369099990e1b1561651e7bd097ebf"
        );
    }
}
