//! Budgets from the ledger: rebuilt on start (so a restarted gateway
//! enforces the same spend) and, with Redis, reconciled with the shared
//! counters periodically (the lake is the truth). The spool (what is spooled
//! but maybe not yet in the lake) is read first, then the lake's hours of
//! the current periods, each event once (by `event_id`). Spool first: an
//! event drained meanwhile is in the lake by the time the lake is read.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use anyhow::Context;
use tollgate_collector::Gateway;
use tollgate_collector::policy::quota::Quota;
use tollgate_schemas::UsageEvent;

use crate::config::Config;
use crate::pipeline;

/// Seeds each budget of `gateway` with its spend in the current period and,
/// with Redis, starts the periodic reconciliation.
pub async fn rebuild(config: &Config, gateway: &Gateway) -> anyhow::Result<()> {
    let quota = gateway.quota.clone();
    if quota.rebuild().since().is_none() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let spend = tokio::task::block_in_place(|| ledger_spend(config, &quota))?;
    for (name, units) in &spend {
        tracing::info!(
            budget = name.as_str(),
            spent_usd = %tollgate_schemas::Usd::from_scaled(i128::from(*units)).unwrap_or_default(),
            "budget spend rebuilt from the ledger"
        );
    }
    tracing::debug!(ms = started.elapsed().as_millis() as u64, "budgets rebuilt");
    quota.seed_budgets(&spend).await;
    let shared = quota.shared().cloned();
    if let (Some(every), Some(shared)) = (
        config.collector.limits.redis.as_ref().map(|r| r.reconcile),
        shared,
    ) {
        let config = config.clone();
        let reconnected = shared.reconnected.clone();
        tokio::spawn(async move {
            loop {
                // Every interval, and as soon as Redis is back (it may
                // have lost what it held).
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = reconnected.notified() => {}
                }
                let (c, q) = (config.clone(), quota.clone());
                match tokio::task::spawn_blocking(move || ledger_spend(&c, &q)).await {
                    Ok(Ok(spend)) => quota.reconcile(&spend).await,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "budget reconciliation: cannot read the ledger")
                    }
                    Err(e) => tracing::warn!(error = %e, "budget reconciliation failed"),
                }
            }
        });
    }
    Ok(())
}

/// Each budget's spend in its current period, in 10^-10 USD, from this
/// gateway's spool and the lake. An unreadable lake is logged, not fatal:
/// refusing every request because the lake is briefly away would be worse
/// than a budget that starts from the spool's spend.
fn ledger_spend(config: &Config, quota: &Arc<Quota>) -> anyhow::Result<BTreeMap<String, i64>> {
    let mut rebuild = quota.rebuild();
    let Some(since) = rebuild.since() else {
        return Ok(BTreeMap::new());
    };
    let spool_dir = &config.pipeline.spool_dir;
    let mut seen = HashSet::new();
    tollgate_spool::scan(spool_dir, |record| {
        if let Ok(e) = serde_json::from_slice::<UsageEvent>(record)
            && e.ts_start >= since
            && seen.insert(e.event_id)
        {
            rebuild.add(&e);
        }
    })
    .with_context(|| format!("reading the spool {}", spool_dir.display()))?;
    let read = pipeline::lake(&config.pipeline).and_then(|lake| {
        Ok(lake.each_event_since(since, |e| {
            if !seen.contains(&e.event_id) {
                rebuild.add(e);
            }
        })?)
    });
    if let Err(e) = read {
        tracing::error!(
            error = %e,
            "could not read the lake for budget spend; budgets count the spool's spend only"
        );
    }
    Ok(rebuild.spend())
}
