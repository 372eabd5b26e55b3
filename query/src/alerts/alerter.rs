//! The evaluation loop: every `evaluate_ms`, the ledger is brought up to
//! date, the rules run, and what they find is claimed, recorded and handed
//! to the outbox.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use tollgate_lake::store::Store;
use tollgate_schemas::period::{period_end, period_start};

use super::alert::{Alert, Budget, Status};
use super::claims::{self, Claims, Records};
use super::config::AlertSettings;
use super::deliver;
use super::evaluate::{self, Condition, Dimension};
use super::ledger;
use crate::engine::Engine;
use crate::rules::LimitRules;

/// The evaluation loop's state.
pub struct Alerter {
    engine: Arc<Engine>,
    store: Arc<Store>,
    settings: AlertSettings,
    rules: LimitRules,
    claims: Claims,
    records: Records,
    outbox: deliver::Outbox,
    index: ledger::Index,
    /// Keys known to be claimed (by anyone): not asked about again.
    claimed: HashSet<String>,
    /// Open pipeline episodes: (check and subject) -> episode id.
    episodes: std::collections::HashMap<String, String>,
    /// Conditions whose episode state was read from the claims.
    checked: HashSet<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error(transparent)]
    Outbox(#[from] deliver::OutboxError),
    #[error(transparent)]
    Claim(#[from] claims::ClaimError),
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
}

impl Alerter {
    /// Opens the outbox and the claims, and starts the evaluation and
    /// delivery tasks on the current runtime.
    pub fn start(
        engine: Arc<Engine>,
        store: Arc<Store>,
        records: Records,
        settings: AlertSettings,
        rules: LimitRules,
    ) -> Result<(), AlertError> {
        let metrics = engine.metrics().alerts.clone();
        let (outbox, unclaimed) = deliver::Outbox::open(
            &settings.config.outbox_dir,
            settings.config.webhooks.clone(),
            metrics,
        )?;
        let claims = match &settings.redis {
            Some((url, prefix, timeout)) => Claims::redis(url, prefix, *timeout, store.clone())?,
            None => Claims::lake(store.clone()),
        };
        tracing::info!(
            claims = claims.describe(),
            webhooks = settings.config.webhooks.len(),
            every_ms = settings.config.evaluate.as_millis() as u64,
            "alerts: evaluating budgets, forecasts, anomalies and pipeline health"
        );
        tokio::spawn(outbox.clone().run());
        let mut alerter = Alerter {
            engine,
            store,
            settings,
            rules,
            claims,
            records,
            outbox,
            index: ledger::Index::default(),
            claimed: HashSet::new(),
            episodes: Default::default(),
            checked: HashSet::new(),
        };
        tokio::spawn(async move {
            for e in unclaimed {
                if let Err(err) = alerter.send_claimed(e.alert).await {
                    tracing::warn!(error = %err, "alerts: an alert left from the last run is not sent yet");
                }
            }
            let every = alerter.settings.config.evaluate;
            // The last failure logged: a new one is logged, a repeat is not.
            let mut last_error: Option<String> = None;
            loop {
                let started = Instant::now();
                let result = alerter.tick(Utc::now()).await;
                let took = started.elapsed();
                let metrics = &alerter.engine.metrics().alerts;
                metrics.evaluated(result.is_ok(), took);
                match result {
                    Ok(()) => {
                        if last_error.take().is_some() {
                            tracing::info!("alerts: evaluating again");
                        }
                    }
                    Err(e) => {
                        let text = e.to_string();
                        if last_error.as_deref() != Some(text.as_str()) {
                            tracing::warn!(error = %text, "alerts: evaluation failed; retrying each tick");
                            last_error = Some(text);
                        }
                    }
                }
                tokio::time::sleep(every.saturating_sub(took).max(every / 4)).await;
            }
        });
        Ok(())
    }

    /// One evaluation at `now`.
    pub async fn tick(&mut self, now: DateTime<Utc>) -> Result<(), AlertError> {
        let config = self.settings.config.clone();
        let rules = self.rules.clone();
        let budgets: Vec<Budget> = (rules.budgets.iter())
            .map(|spec| {
                let start = period_start(spec.period, spec.timezone, now);
                Budget {
                    spec,
                    start,
                    end: period_end(spec.period, spec.timezone, start),
                }
            })
            .collect();
        let current = evaluate::hour_of(now);
        let from = (budgets.iter().map(|b| evaluate::hour_of(b.start)))
            .chain([
                current - 3600 * evaluate::anomaly_hours(&config),
                current - 3600 * i64::from(config.forecast_window_h),
            ])
            .min()
            .unwrap_or(current);
        // A ledger that cannot be read stops the spend rules, never the
        // pipeline's checks: an unreadable lake is when they matter most.
        let refreshed = self
            .index
            .refresh(&self.engine, &self.store, &budgets, &rules.fallbacks, from)
            .await;
        let hours = &self.index.hours;
        let source = self.settings.source.clone();
        let mut found = Vec::new();
        if refreshed.is_ok() {
            for (i, b) in budgets.iter().enumerate() {
                found.extend(evaluate::thresholds(hours, i, b, &source));
                found.extend(evaluate::forecast(hours, i, b, now, &config, &source));
            }
            for dim in [Dimension::Consumer, Dimension::Model] {
                found.extend(evaluate::anomalies(hours, dim, now, &config, &source));
            }
        }
        let reading = self.settings.probe.as_ref().and_then(|p| p.read());
        let dead = {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.list(tollgate_lake::layout::DEAD_LETTERS))
                .await
                .ok()
                .and_then(Result::ok)
                .map(|k| k.len() as u64)
        };
        let conditions = evaluate::pipeline(reading.as_ref(), dead, hours, now, &config);
        tracing::debug!(
            summed = refreshed.as_ref().ok(),
            hours = hours.len(),
            found = found.len(),
            conditions = conditions.len(),
            "alerts: evaluated"
        );
        for alert in found {
            self.fire(alert).await?;
        }
        for c in conditions {
            self.follow(&c).await?;
        }
        refreshed.map(|_| ()).map_err(AlertError::from)
    }

    /// Sends `alert` unless its key is taken.
    async fn fire(&mut self, alert: Alert) -> Result<(), AlertError> {
        if self.claimed.contains(&alert.key) {
            return Ok(());
        }
        if self.claims.holder(&alert.key).await?.is_some() {
            self.claimed.insert(alert.key);
            return Ok(());
        }
        self.outbox.stage(&alert)?;
        self.send_claimed(alert).await
    }

    /// Claims `alert`'s key and, if won, records and delivers it.
    async fn send_claimed(&mut self, alert: Alert) -> Result<(), AlertError> {
        match self.claims.claim(&alert.key, &alert.id).await? {
            Some(_) => {
                self.outbox.lost(&alert);
            }
            None => {
                self.records.put(&alert).await?;
                self.outbox.claimed(&alert)?;
                self.engine.metrics().alerts.fired(alert.kind);
                tracing::info!(kind = alert.kind.as_str(), key = %alert.key, "alert: {}", alert.message);
            }
        }
        self.claimed.insert(alert.key);
        Ok(())
    }

    /// A health condition: an episode opens (one alert) when it starts
    /// firing and closes (a resolved notice) when it clears. The open
    /// episode is a claim of its own, so processes and restarts agree.
    async fn follow(&mut self, c: &Condition) -> Result<(), AlertError> {
        let marker = format!("episode:{}:{}", c.check, c.subject);
        if !self.checked.contains(&marker) && !self.episodes.contains_key(&marker) {
            if let Some(id) = self.claims.holder(&marker).await? {
                self.episodes.insert(marker.clone(), id);
            }
            self.checked.insert(marker.clone());
        }
        let source = self.settings.source.clone();
        match (c.firing, self.episodes.get(&marker).cloned()) {
            (true, known) => {
                // Fired again after a crash between the two claims: the
                // alert's own key keeps it to once.
                let id = match known {
                    Some(id) => id,
                    None => {
                        let episode = uuid::Uuid::now_v7().to_string();
                        let id = (self.claims.claim(&marker, &episode).await?).unwrap_or(episode);
                        self.episodes.insert(marker, id.clone());
                        id
                    }
                };
                self.fire(evaluate::condition_alert(c, &id, Status::Firing, &source))
                    .await
            }
            (false, Some(id)) => {
                self.fire(evaluate::condition_alert(c, &id, Status::Resolved, &source))
                    .await?;
                self.claims.release(&marker).await?;
                self.episodes.remove(&marker);
                Ok(())
            }
            (false, None) => Ok(()),
        }
    }
}
