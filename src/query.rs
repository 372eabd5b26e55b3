//! The query service's settings from the config file, and `gen-lake`.

use std::sync::{Arc, OnceLock};

use anyhow::Context;
use chrono::{DateTime, Duration as Days, Utc};
use rust_decimal::Decimal;
use tollgate_collector::config::LimitsConfig;
use tollgate_collector::config::limits::{Scope, Unit};
use tollgate_collector::ledger::tap::Counters;
use tollgate_ingest::Lake;
use tollgate_ingest::synth::Synth;
use tollgate_query::alerts::{AlertSettings, PipelineProbe, PipelineReading};
use tollgate_query::rules::{BudgetSpec, LimitRules, RateLimitSpec, RuleScope};
use tollgate_query::{QueryService, QuerySettings, Tenant};
use tollgate_schemas::PriceCatalog;
use tollgate_schemas::Usd;

use crate::config::Config;

/// The query service's settings: its `[query]` section, with the lake
/// (`[pipeline]`), the tenants (`[[consumers]]`) and the catalogs (the
/// gateway's, then `query.catalogs`) from the other sections. `None`
/// without a `[query]` table.
pub fn settings(
    config: &Config,
    probe: Option<Arc<dyn PipelineProbe>>,
) -> anyhow::Result<Option<(QuerySettings, usize)>> {
    let Some(q) = &config.query else {
        return Ok(None);
    };
    let gateway = &config.collector;
    let mut catalogs = vec![match &gateway.gateway.prices {
        Some(path) => PriceCatalog::load(path)?,
        None => PriceCatalog::shipped()?,
    }];
    for path in &q.catalogs {
        let c = PriceCatalog::load(path)?;
        if catalogs.iter().any(|k| k.version() == c.version()) {
            anyhow::bail!("query.catalogs: version {:?} is loaded twice", c.version());
        }
        catalogs.push(c);
    }
    let tenants = gateway
        .consumers
        .iter()
        .map(|c| Tenant {
            name: c.name.clone(),
            key_hashes: c.key_hashes.clone(),
            team: c.team.clone(),
        })
        .collect();
    let p = &config.pipeline;
    let lake_options = p.lake_options.clone().into_iter().collect();
    let rules = limit_rules(&gateway.limits);
    let mut settings = q.settings(p.lake.clone(), lake_options, tenants, catalogs, rules);
    // Alert claims go where the limits' shared counters are, when they are.
    let redis = gateway.limits.redis.as_ref().map(|r| {
        (
            r.url.expose().to_string(),
            format!("{}:", r.prefix),
            r.timeout.max(std::time::Duration::from_millis(500)),
        )
    });
    settings.alerts = Some(AlertSettings {
        config: config.alerts.clone(),
        redis,
        source: gateway.gateway.instance.clone(),
        probe,
    });
    Ok(Some((settings, q.threads)))
}

/// The gateway's `[[rate_limits]]` and `[[budgets]]` as the query
/// service's `rate_limits` and `budgets` tables describe them.
fn limit_rules(limits: &LimitsConfig) -> LimitRules {
    let scope = |s: &Scope| RuleScope {
        model: s.model.as_ref().map(|p| p.as_str().to_string()),
        consumer: s.consumer.as_ref().map(|p| p.as_str().to_string()),
        team: s.team.as_ref().map(|p| p.as_str().to_string()),
        tag: s.tag.as_ref().map(|(k, p)| format!("{k}={}", p.as_str())),
        exempt: s.exempt.clone(),
    };
    let mut rules = LimitRules::default();
    for r in &limits.rate_limits {
        if let Some(m) = r.on_limit.fallback() {
            rules.fallbacks.push((r.name.clone(), m.to_string()));
        }
        for l in &r.limits {
            let limit = match l.unit {
                Unit::Usd => Usd::from_scaled(i128::from(l.limit))
                    .unwrap_or_default()
                    .decimal(),
                _ => Decimal::from(l.limit),
            };
            rules.rate_limits.push(RateLimitSpec {
                name: r.name.clone(),
                scope: scope(&r.scope),
                key: r.key.as_config(),
                matches: r.matches.iter().map(|m| m.as_config()).collect(),
                unit: l.unit.as_str().into(),
                window: l.window.as_str().into(),
                limit,
                count: r.count.as_str().into(),
                default_output_tokens: r.default_output_tokens,
                on_limit: if r.on_limit.fallback().is_some() {
                    "fallback"
                } else {
                    "reject"
                }
                .into(),
                fallback: r.on_limit.fallback().map(str::to_string),
            });
        }
    }
    for b in &limits.budgets {
        if let Some(m) = b.on_exhausted.fallback() {
            rules.fallbacks.push((b.name.clone(), m.to_string()));
        }
        rules.budgets.push(BudgetSpec {
            name: b.name.clone(),
            scope: scope(&b.scope),
            usd: b.usd,
            period: b.period,
            timezone: b.timezone,
            alert_at: b.alert_at.clone(),
            on_exhausted: b.on_exhausted.as_str().into(),
            downgrade: b.on_exhausted.fallback().map(str::to_string),
        });
    }
    rules
}

/// Starts the query service, with its alerts; `probe` reads the pipeline
/// of the gateway in this process, if there is one.
pub async fn start(
    config: &Config,
    probe: Option<Arc<dyn PipelineProbe>>,
) -> anyhow::Result<Option<QueryService>> {
    let Some((settings, threads)) = settings(config, probe)? else {
        return Ok(None);
    };
    let service = QueryService::start(settings, threads).await?;
    println!("query API on http://{}", service.http);
    if let Some(pg) = service.pg {
        println!("PostgreSQL wire on {pg}");
    }
    Ok(Some(service))
}

/// The pipeline of `tollgate serve`, as the alerts read it: the spool's
/// backlog and the events the tap spooled per hour.
pub struct Probe {
    pub instance: String,
    /// `[pipeline] spool_dir`, as written.
    pub spool: String,
    pub backlog: tollgate_spool::Backlog,
    /// Set once the gateway's tap has started.
    pub tap: OnceLock<Arc<Counters>>,
}

impl PipelineProbe for Probe {
    fn read(&self) -> Option<PipelineReading> {
        let tap = self.tap.get()?;
        Some(PipelineReading {
            instance: self.instance.clone(),
            spool: self.spool.clone(),
            backlog_bytes: self.backlog.bytes(),
            oldest_unsent: self.backlog.oldest().map(chrono::DateTime::<Utc>::from),
            spooled_by_hour: tap.whole_hours(),
        })
    }
}

#[derive(clap::Args)]
pub struct GenLakeArgs {
    /// The lake directory to write into.
    #[arg(long, default_value = "data/lake")]
    pub lake: String,
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Spread over this many days, ending now.
    #[arg(long, default_value_t = 30)]
    pub days: u32,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// A realistic synthetic lake: the synthesiser's mix of consumers, models,
/// streams, fallbacks and cache hits, one file per hour.
pub fn gen_lake(a: &GenLakeArgs) -> anyhow::Result<()> {
    let lake = Lake::at(&a.lake, &[]).context("opening the lake")?;
    let end = Utc::now();
    let start: DateTime<Utc> = end - Days::days(i64::from(a.days.max(1)));
    let span_us = (end - start).num_microseconds().unwrap_or(i64::MAX) as u64;
    let gap_us = (span_us / a.events.max(1)).max(1);
    let mut synth = Synth::new(a.seed, start, gap_us)?;
    let bar = indicatif::ProgressBar::new(a.events);
    let source = format!("gen.{}", a.seed);
    let mut batch = Vec::new();
    let mut first = 0u64;
    let mut hour = None;
    for i in 0..a.events {
        let e = synth.next_event();
        let h = tollgate_lake::layout::hour_dir(e.ts_start);
        if hour.as_ref().is_some_and(|x| *x != h) && !batch.is_empty() {
            lake.publish(
                &source,
                &format!("{first:012}"),
                &format!("{:012}", i - 1),
                std::mem::take(&mut batch),
            )?;
            first = i;
            bar.set_position(i);
        }
        hour = Some(h);
        batch.push(e);
    }
    if !batch.is_empty() {
        lake.publish(
            &source,
            &format!("{first:012}"),
            &format!("{:012}", a.events - 1),
            batch,
        )?;
    }
    bar.finish_and_clear();
    println!(
        "wrote {} events over {} days into {}",
        a.events,
        a.days,
        lake.describe()
    );
    Ok(())
}
