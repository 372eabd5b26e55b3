//! What the policy steps cost in process, without the network: the content
//! guard on a 4 KB prompt and on a 1,000-token stream (against the same
//! work without it), and the semantic cache's lookup at 100,000 entries.
//! Run by `scripts/bench.sh cache` (which writes BENCHMARKS.md); prints one
//! JSON object per figure. Under `cargo test` (no `--bench` argument) it
//! runs once at a small size, as a check that it still works.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use tollgate_collector::config::Config;
use tollgate_collector::policy::cache::semantic::{Index, unit};
use tollgate_collector::policy::screen::holdback::{Holdback, Released};
use tollgate_collector::policy::screen::{Direction, Screen, input};
use tollgate_collector::upstream::Endpoint;

const RULE: &str = r#"
[upstreams.sim]
kind = "simulated"
[[routes]]
model = "m"
targets = [{ upstream = "sim" }]
[[guard]]
name = "no-pii"
detect = ["email", "phone", "bank_card", "cn_resident_id", "secret"]
deny = ["keyword:internal-only", "keyword:project falcon", "regex:(?i)confidential\\s+draft"]
"#;

/// About 4 KB of ordinary prose with numbers and punctuation, nothing a
/// detector keeps.
fn prompt() -> String {
    let para = "Please summarise the spend of the search team for the week of 14 to 21 October: \
                3 models, 1,204,331 input tokens and 98,220 output tokens, at $0.55 per million. \
                Compare it with the 2 weeks before, note anything above 15% and list the top 5 consumers. ";
    let mut s = String::new();
    while s.len() < 4096 {
        s.push_str(para);
    }
    s.truncate(4096);
    s
}

fn per_iter(n: u32, mut f: impl FnMut()) -> Duration {
    for _ in 0..n / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed() / n
}

fn report(name: &str, extra: Value, took: Duration) {
    let mut o = json!({"name": name, "us": took.as_secs_f64() * 1e6});
    if let Value::Object(m) = extra {
        o.as_object_mut().unwrap().extend(m);
    }
    println!("{o}");
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let scale = |n: u32| if full { n } else { (n / 100).max(1) };
    let config = Config::from_toml(RULE).unwrap();
    let screen = Screen::new(
        &config.guards,
        &HashMap::new(),
        Default::default(),
        Default::default(),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let text = prompt();
    let body: Map<String, Value> = serde_json::from_value(json!({
        "model": "m",
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}],
    }))
    .unwrap();
    let rules = screen.applying(Direction::Input, "m", "c", None);
    let on = per_iter(scale(20_000), || {
        let mut b = body.clone();
        let r = rt.block_on(input::screen(
            &rules,
            &screen.counters,
            Endpoint::ChatCompletions,
            &mut b,
        ));
        black_box(r.is_ok());
    });
    let off = per_iter(scale(20_000), || {
        black_box(body.clone());
    });
    report(
        "guard_input_4k",
        json!({"bytes": text.len(), "off_us": off.as_secs_f64() * 1e6}),
        on.saturating_sub(off),
    );

    let out_rules = screen.applying(Direction::Output, "m", "c", None);
    let events: Vec<Vec<u8>> = (0..1000)
        .map(|i| {
            let doc = json!({"id": "x", "object": "chat.completion.chunk", "model": "m",
                "choices": [{"index": 0, "delta": {"content": format!(" w{}", i % 97)}, "finish_reason": null}]});
            format!("data: {doc}\n\n").into_bytes()
        })
        .collect();
    let stream_on = per_iter(scale(200), || {
        let mut h = Holdback::new(out_rules.clone(), screen.counters.clone()).unwrap();
        let mut n = 0;
        for e in &events {
            if let Released::Events(v) = h.push(e) {
                n += v.len();
            }
        }
        if let Released::Events(v) = h.push(b"data: [DONE]\n\n") {
            n += v.len();
        }
        assert_eq!(n, 1001);
    });
    report(
        "guard_stream_1000_tokens",
        json!({"events": 1000, "per_event_us": stream_on.as_secs_f64() * 1e6 / 1000.0}),
        stream_on,
    );

    let sizes: &[usize] = if full { &[64, 256, 1024] } else { &[64] };
    for &dims in sizes {
        let rows = if full { 100_000 } else { 1_000 };
        let index = Index::new(rows);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut vector = || {
            let v: Vec<f32> = (0..dims)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect();
            unit(v).unwrap()
        };
        for i in 0..rows {
            index.insert(
                "p",
                &vector(),
                format!("{i:064x}"),
                Duration::from_secs(3600),
            );
        }
        let q = vector();
        let took = per_iter(scale(if dims > 256 { 20 } else { 100 }), || {
            black_box(index.nearest("p", &q, 0.9));
        });
        report(
            "semantic_nearest",
            json!({"rows": rows, "dims": dims}),
            took,
        );
    }
}
