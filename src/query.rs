//! The query service's settings from the config file, and `gen-lake`.

use anyhow::Context;
use chrono::{DateTime, Duration as Days, Utc};
use tollgate_ingest::Lake;
use tollgate_ingest::synth::Synth;
use tollgate_query::{QueryService, QuerySettings, Tenant};
use tollgate_schemas::PriceCatalog;

use crate::config::Config;

/// The query service's settings: its `[query]` section, with the lake
/// (`[pipeline]`), the tenants (`[[consumers]]`) and the catalogs (the
/// gateway's, then `query.catalogs`) from the other sections. `None`
/// without a `[query]` table.
pub fn settings(config: &Config) -> anyhow::Result<Option<(QuerySettings, usize)>> {
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
        })
        .collect();
    let p = &config.pipeline;
    let lake_options = p.lake_options.clone().into_iter().collect();
    let settings = q.settings(p.lake.clone(), lake_options, tenants, catalogs);
    Ok(Some((settings, q.threads)))
}

pub async fn start(config: &Config) -> anyhow::Result<Option<QueryService>> {
    let Some((settings, threads)) = settings(config)? else {
        return Ok(None);
    };
    let service = QueryService::start(settings, threads).await?;
    println!("query API on http://{}", service.http);
    if let Some(pg) = service.pg {
        println!("PostgreSQL wire on {pg}");
    }
    Ok(Some(service))
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
