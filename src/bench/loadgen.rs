//! `tollgate bench loadgen`: an open-loop load generator for what wrk cannot
//! measure: latency at a fixed request rate, time to first token on
//! streams, and many long-lived streams held open at once. Prints one JSON
//! object. Throughput is measured with wrk (see scripts/bench.sh).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use tokio::sync::Semaphore;

#[derive(Args)]
pub struct LoadgenArgs {
    /// Full URL of a chat completions endpoint.
    #[arg(long)]
    url: String,
    #[arg(long, default_value = "")]
    key: String,
    #[arg(long, default_value = "qwq-32b")]
    model: String,
    #[arg(long)]
    stream: bool,
    /// Requests per second (open loop); 0 = send `--open` requests at once.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// With `--rate 0`: how many requests to hold open together.
    #[arg(long, default_value_t = 0)]
    open: usize,
    /// Most requests in flight at once.
    #[arg(long, default_value_t = 2048)]
    max_in_flight: usize,
}

struct Sample {
    total: Duration,
    first: Duration,
    ok: bool,
}

pub async fn run(a: LoadgenArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(a.max_in_flight)
        .tcp_nodelay(true)
        .build()?;
    let body = serde_json::json!({
        "model": a.model,
        "stream": a.stream,
        "messages": [{"role": "user", "content": "Summarise the gateway's cost per consumer for last week."}],
    })
    .to_string();
    let body = bytes::Bytes::from(body);
    let limit = Arc::new(Semaphore::new(a.max_in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    let mut skipped = 0u64;
    let fire = |tasks: &mut tokio::task::JoinSet<Sample>, permit| {
        let (client, url, key, body) = (client.clone(), a.url.clone(), a.key.clone(), body.clone());
        tasks.spawn(async move {
            let _permit = permit;
            one(&client, &url, &key, body).await
        });
    };
    if a.rate <= 0.0 {
        for _ in 0..a.open {
            let permit = limit.clone().acquire_owned().await?;
            fire(&mut tasks, permit);
        }
    } else {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while started.elapsed().as_secs_f64() < a.duration_s {
            tick.tick().await;
            match limit.clone().try_acquire_owned() {
                Ok(permit) => fire(&mut tasks, permit),
                Err(_) => skipped += 1,
            }
        }
    }
    let sent_for = started.elapsed();
    let mut samples = Vec::new();
    while let Some(r) = tasks.join_next().await {
        samples.extend(r.ok());
    }
    let errors = samples.iter().filter(|s| !s.ok).count();
    let mut total: Vec<u64> = samples
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.total.as_micros() as u64)
        .collect();
    let mut first: Vec<u64> = samples
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.first.as_micros() as u64)
        .collect();
    total.sort_unstable();
    first.sort_unstable();
    let out = serde_json::json!({
        "requests": samples.len(),
        "errors": errors,
        "skipped": skipped,
        "seconds": sent_for.as_secs_f64(),
        "latency_p50_us": pct(&total, 50.0),
        "latency_p99_us": pct(&total, 99.0),
        "ttfb_p50_us": pct(&first, 50.0),
        "ttfb_p99_us": pct(&first, 99.0),
    });
    println!("{out}");
    Ok(())
}

async fn one(client: &reqwest::Client, url: &str, key: &str, body: bytes::Bytes) -> Sample {
    let t = Instant::now();
    let mut first = None;
    let mut ok = false;
    let sent = client
        .post(url)
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    if let Ok(resp) = sent {
        ok = resp.status().is_success();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(c) if !c.is_empty() => {
                    first.get_or_insert_with(|| t.elapsed());
                }
                Ok(_) => {}
                Err(_) => {
                    ok = false;
                    break;
                }
            }
        }
    }
    let total = t.elapsed();
    Sample {
        total,
        first: first.unwrap_or(total),
        ok,
    }
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
