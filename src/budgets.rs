//! Budgets rebuilt from the ledger on start: the spool (what is spooled
//! but maybe not yet in the lake) is read first, then the lake's hours of
//! the current periods, each event once (by `event_id`). Spool first: an
//! event drained meanwhile is in the lake by the time the lake is read.

use std::collections::HashSet;

use anyhow::Context;
use tollgate_collector::Gateway;
use tollgate_schemas::UsageEvent;

use crate::config::Config;
use crate::pipeline;

/// Seeds each budget of `gateway` with its spend in the current period.
pub async fn rebuild(config: &Config, gateway: &Gateway) -> anyhow::Result<()> {
    let quota = gateway.quota.clone();
    let mut rebuild = quota.rebuild();
    let Some(since) = rebuild.since() else {
        return Ok(());
    };
    let spool_dir = config.pipeline.spool_dir.clone();
    let lake = pipeline::lake(&config.pipeline)?;
    let started = std::time::Instant::now();
    let spend = tokio::task::block_in_place(|| -> anyhow::Result<_> {
        let mut seen = HashSet::new();
        tollgate_spool::scan(&spool_dir, |record| {
            if let Ok(e) = serde_json::from_slice::<UsageEvent>(record)
                && e.ts_start >= since
                && seen.insert(e.event_id)
            {
                rebuild.add(&e);
            }
        })
        .with_context(|| format!("reading the spool {}", spool_dir.display()))?;
        lake.each_event_since(since, |e| {
            if !seen.contains(&e.event_id) {
                rebuild.add(e);
            }
        })
        .context("reading the lake for budget spend")?;
        Ok(rebuild.spend())
    })?;
    for (name, units) in &spend {
        tracing::info!(
            budget = name.as_str(),
            spent_usd = %tollgate_schemas::Usd::from_scaled(i128::from(*units)).unwrap_or_default(),
            "budget spend rebuilt from the ledger"
        );
    }
    tracing::debug!(ms = started.elapsed().as_millis() as u64, "budgets rebuilt");
    quota.seed_budgets(&spend).await;
    Ok(())
}
