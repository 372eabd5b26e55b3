//! The gateway's configuration: one TOML file, `${ENV}` interpolation for
//! secrets, then validation into typed settings.
//!
//! Raw structs mirror the file (`deny_unknown_fields`, so a typo is an
//! error); `validate` turns them into [`Config`]. Every error names the key
//! path and the line it comes from.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::upstream::simulate::SimSettings;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

type Result<T> = std::result::Result<T, ConfigError>;

/// A secret from the config (an upstream API key). Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

// ---------------------------------------------------------------- typed config

#[derive(Debug, Clone)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub pipeline: PipelineConfig,
    /// The query service; `None` when the file has no `[query]` table.
    pub query: Option<QueryConfig>,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    pub consumers: Vec<ConsumerConfig>,
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    /// Largest non-streamed upstream response the gateway will hold.
    pub max_response_bytes: usize,
    /// Name written into every event's `gateway_instance`.
    pub instance: String,
    /// A price catalog file; `None` = the catalog shipped in the binary.
    pub prices: Option<PathBuf>,
    pub client_ip: ClientIp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientIp {
    /// Recorded as seen.
    Plain,
    /// Recorded as a salted-free SHA-256 prefix: joinable, not readable.
    Hashed,
    /// Not recorded.
    Off,
}

/// Where usage events go after the tap: the spool, then Kafka (when
/// configured) or straight to the lake (embedded mode).
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub spool_dir: PathBuf,
    /// A local directory, or `s3://bucket/prefix`.
    pub lake: String,
    /// Object store settings for an `s3://` lake (`endpoint`, `region`,
    /// `access_key_id`, `secret_access_key`, `allow_http`, ...); the
    /// `AWS_*` environment variables fill in what is not given.
    pub lake_options: BTreeMap<String, String>,
    /// Events held in memory before the tap counts overflow.
    pub queue_capacity: usize,
    pub spool_max_bytes: u64,
    pub spool_segment_bytes: u64,
    /// Group commit: a batch is made durable within this many ms...
    pub commit_ms: u64,
    /// ...or once this many events wait.
    pub commit_events: usize,
    /// Parquet files are written at least this often while events arrive...
    pub flush_ms: u64,
    /// ...or once this many rows are buffered.
    pub flush_rows: usize,
    /// Messages larger than this go to dead letters.
    pub max_event_bytes: usize,
    /// How long a stopping gateway keeps draining its spool; what is left
    /// stays there for the next start.
    pub drain_ms: u64,
    pub kafka: Option<KafkaConfig>,
}

/// `[query]`: SQL and reports over the lake (`tollgate query`, and part of
/// `tollgate serve` when present).
#[derive(Debug, Clone)]
pub struct QueryConfig {
    pub listen: SocketAddr,
    /// The PostgreSQL wire endpoint; `None` leaves it off.
    pub pg_listen: Option<SocketAddr>,
    /// Sees every row; unset or empty lets only consumer keys in.
    pub admin_token: Option<Secret>,
    /// More catalogs to reprice with (`catalog=`), besides the gateway's.
    pub catalogs: Vec<PathBuf>,
    pub threads: usize,
    pub memory_mb: usize,
    pub max_rss_mb: u64,
    pub timeout_ms: u64,
    pub max_result_rows: usize,
    pub max_result_mb: usize,
    pub max_concurrent: usize,
    pub max_generated_rows: u64,
    /// MiB of Parquet footers kept between queries.
    pub cache_mb: usize,
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    /// Consumer group of the ingesters.
    pub group: String,
    /// Partitions to create the topic with when it does not exist.
    pub partitions: i32,
    /// Static group membership (`group.instance.id`): a restarted ingester
    /// with the same name takes its partitions back at once instead of
    /// waiting for its old session to expire. Unique per ingester.
    pub member: Option<String>,
    /// Extra librdkafka properties, passed through as given.
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub provider: String,
    pub kind: UpstreamKind,
}

#[derive(Debug, Clone)]
pub enum UpstreamKind {
    OpenAi(OpenAiUpstreamConfig),
    Simulated(SimSettings),
}

#[derive(Debug, Clone)]
pub struct OpenAiUpstreamConfig {
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    /// Longest silence between two body chunks before the attempt fails.
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub model: String,
    pub targets: Vec<TargetConfig>,
    pub fallback: Vec<String>,
    pub fallback_on: Vec<FallbackTrigger>,
}

#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub upstream: String,
    /// Model name sent upstream; `None` = the name the client asked for.
    pub model: Option<String>,
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum FallbackTrigger {
    #[serde(rename = "connect")]
    Connect,
    #[serde(rename = "timeout")]
    Timeout,
    #[serde(rename = "5xx")]
    ServerError,
    #[serde(rename = "429")]
    RateLimited,
    #[serde(rename = "4xx")]
    ClientError,
}

pub const DEFAULT_FALLBACK_ON: [FallbackTrigger; 4] = [
    FallbackTrigger::Connect,
    FallbackTrigger::Timeout,
    FallbackTrigger::ServerError,
    FallbackTrigger::RateLimited,
];

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub name: String,
    pub team: Option<String>,
    /// SHA-256 digests of the consumer's keys.
    pub key_hashes: Vec<[u8; 32]>,
    /// Model globs the consumer may call; `None` = all.
    pub models: Option<Vec<String>>,
}

// ------------------------------------------------------------------ raw file

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    gateway: RawGateway,
    #[serde(default)]
    pipeline: RawPipeline,
    query: Option<RawQuery>,
    #[serde(default)]
    upstreams: BTreeMap<String, Spanned<RawUpstream>>,
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    consumers: Vec<Spanned<RawConsumer>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    listen: Option<Spanned<String>>,
    max_body_bytes: Option<usize>,
    max_response_bytes: Option<usize>,
    instance: Option<String>,
    prices: Option<PathBuf>,
    client_ip: Option<ClientIp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuery {
    listen: Option<SocketAddr>,
    pg_listen: Option<String>,
    admin_token: Option<String>,
    #[serde(default)]
    catalogs: Vec<PathBuf>,
    threads: Option<usize>,
    memory_mb: Option<usize>,
    max_rss_mb: Option<u64>,
    timeout_ms: Option<u64>,
    max_result_rows: Option<usize>,
    max_result_mb: Option<usize>,
    max_concurrent: Option<usize>,
    max_generated_rows: Option<u64>,
    cache_mb: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    spool_dir: Option<PathBuf>,
    lake: Option<String>,
    #[serde(default)]
    lake_options: BTreeMap<String, String>,
    queue_capacity: Option<usize>,
    spool_max_bytes: Option<u64>,
    spool_segment_bytes: Option<u64>,
    commit_ms: Option<u64>,
    commit_events: Option<usize>,
    flush_ms: Option<u64>,
    flush_rows: Option<usize>,
    max_event_bytes: Option<usize>,
    drain_ms: Option<u64>,
    kafka: Option<RawKafka>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    brokers: String,
    topic: Option<String>,
    group: Option<String>,
    partitions: Option<i32>,
    member: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    kind: String,
    provider: Option<String>,
    // openai
    base_url: Option<String>,
    api_key: Option<String>,
    connect_timeout_ms: Option<u64>,
    first_byte_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    // simulated
    latency_ms: Option<u64>,
    tokens_per_s: Option<f64>,
    output_tokens: Option<u32>,
    reasoning_tokens: Option<u32>,
    cached_tokens: Option<u32>,
    error_rate: Option<f64>,
    error_status: Option<u16>,
    usage: Option<bool>,
    usage_every_chunk: Option<bool>,
    usage_style: Option<String>,
    fail_after_chunks: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    model: String,
    targets: Vec<RawTarget>,
    #[serde(default)]
    fallback: Vec<Spanned<String>>,
    fallback_on: Option<Vec<FallbackTrigger>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    upstream: Spanned<String>,
    model: Option<String>,
    weight: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsumer {
    name: String,
    team: Option<String>,
    api_keys: Vec<Spanned<String>>,
    models: Option<Vec<Spanned<String>>>,
}

// ------------------------------------------------------------------- loading

impl Config {
    /// Reads, interpolates and validates `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string(), |name| {
            std::env::var(name).ok()
        })
    }

    /// Parses config text; `env` resolves `${NAME}` references.
    pub fn parse(text: &str, origin: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let invalid = |message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            message,
        };
        let text = interpolate(text, &env).map_err(invalid)?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        validate(raw, &text).map_err(invalid)
    }
}

/// Replaces `${NAME}` in string values with the TOML-escaped value of the
/// variable. Comments are left alone, so a commented-out reference to an
/// unset variable is not an error.
fn interpolate(
    text: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(text.len());
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let code_len = code_part_len(line);
        let (code, comment) = line.split_at(code_len);
        let mut rest = code;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                return Err(format!(
                    "line {}: unterminated ${{ in {:?}",
                    n + 1,
                    line.trim_end()
                ));
            };
            let name = &after[..end];
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("line {}: bad variable name ${{{name}}}", n + 1));
            }
            let value = env(name)
                .ok_or_else(|| format!("line {}: environment variable {name} is not set", n + 1))?;
            for c in value.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    c => out.push(c),
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out.push_str(comment);
    }
    Ok(out)
}

/// Length of `line` before a `#` comment that is outside any string.
fn code_part_len(line: &str) -> usize {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match quote {
            Some('"') if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' => return i,
            None => {}
        }
    }
    line.len()
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn validate(raw: RawConfig, text: &str) -> std::result::Result<Config, String> {
    let at = |span: std::ops::Range<usize>, path: String, msg: String| {
        format!("line {}: {path}: {msg}", line_of(text, span.start))
    };

    let gateway = {
        let g = raw.gateway;
        let listen = match g.listen {
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
            Some(s) => s.get_ref().parse().map_err(|e| {
                at(
                    s.span(),
                    "gateway.listen".into(),
                    format!("{:?} is not an address: {e}", s.get_ref()),
                )
            })?,
        };
        GatewayConfig {
            listen,
            max_body_bytes: g.max_body_bytes.unwrap_or(4 << 20),
            max_response_bytes: g.max_response_bytes.unwrap_or(64 << 20),
            instance: g.instance.unwrap_or_else(default_instance),
            prices: g.prices,
            client_ip: g.client_ip.unwrap_or(ClientIp::Plain),
        }
    };

    let p = raw.pipeline;
    let pipeline = PipelineConfig {
        spool_dir: p.spool_dir.unwrap_or_else(|| PathBuf::from("data/spool")),
        lake: p.lake.unwrap_or_else(|| "data/lake".to_string()),
        lake_options: p.lake_options,
        queue_capacity: p.queue_capacity.unwrap_or(65_536).max(1),
        spool_max_bytes: p.spool_max_bytes.unwrap_or(4 << 30),
        spool_segment_bytes: p.spool_segment_bytes.unwrap_or(64 << 20).max(4096),
        commit_ms: p.commit_ms.unwrap_or(5),
        commit_events: p.commit_events.unwrap_or(1024).max(1),
        flush_ms: p.flush_ms.unwrap_or(2000).max(1),
        flush_rows: p.flush_rows.unwrap_or(200_000).max(1),
        max_event_bytes: p.max_event_bytes.unwrap_or(1 << 20),
        drain_ms: p.drain_ms.unwrap_or(10_000),
        kafka: p.kafka.map(|k| KafkaConfig {
            brokers: k.brokers,
            topic: k.topic.unwrap_or_else(|| "tollgate.usage.v1".to_string()),
            group: k.group.unwrap_or_else(|| "tollgate-ingest".to_string()),
            partitions: k.partitions.unwrap_or(4).max(1),
            member: k.member,
            properties: k.properties,
        }),
    };
    if pipeline.lake.trim().is_empty() {
        return Err("pipeline.lake: must not be empty".into());
    }
    let query = match raw.query {
        None => None,
        Some(q) => {
            let pg_listen = match q.pg_listen.as_deref() {
                None => Some(SocketAddr::from(([127, 0, 0, 1], 5433))),
                Some("off") => None,
                Some(a) => Some(a.parse().map_err(|_| {
                    format!("query.pg_listen: {a:?} is not an address (127.0.0.1:5433) or \"off\"")
                })?),
            };
            Some(QueryConfig {
                listen: q
                    .listen
                    .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8001))),
                pg_listen,
                admin_token: q.admin_token.filter(|t| !t.is_empty()).map(Secret),
                catalogs: q.catalogs,
                threads: q.threads.unwrap_or(2).max(1),
                memory_mb: q.memory_mb.unwrap_or(512).max(16),
                max_rss_mb: q.max_rss_mb.unwrap_or(2048).max(64),
                timeout_ms: q.timeout_ms.unwrap_or(30_000).max(1),
                max_result_rows: q.max_result_rows.unwrap_or(1_000_000).max(1),
                max_result_mb: q.max_result_mb.unwrap_or(256).max(1),
                max_concurrent: q.max_concurrent.unwrap_or(4).max(1),
                max_generated_rows: q.max_generated_rows.unwrap_or(10_000_000).max(1),
                cache_mb: q.cache_mb.unwrap_or(256),
            })
        }
    };

    let mut upstreams = BTreeMap::new();
    for (name, spanned) in raw.upstreams {
        let span = spanned.span();
        let u = spanned.into_inner();
        let path = format!("upstreams.{name}");
        let err = |m: String| at(span.clone(), path.clone(), m);
        let kind = match u.kind.as_str() {
            "openai" => {
                let sim_fields = [
                    u.latency_ms.is_some(),
                    u.tokens_per_s.is_some(),
                    u.output_tokens.is_some(),
                    u.reasoning_tokens.is_some(),
                    u.cached_tokens.is_some(),
                    u.error_rate.is_some(),
                    u.error_status.is_some(),
                    u.usage.is_some(),
                    u.usage_every_chunk.is_some(),
                    u.usage_style.is_some(),
                    u.fail_after_chunks.is_some(),
                ];
                if sim_fields.iter().any(|s| *s) {
                    return Err(err(
                        "simulator settings are only valid with kind = \"simulated\"".into(),
                    ));
                }
                let base_url = u
                    .base_url
                    .ok_or_else(|| err("base_url is required for kind = \"openai\"".into()))?;
                let parsed = reqwest::Url::parse(&base_url)
                    .map_err(|e| err(format!("base_url {base_url:?} is not a URL: {e}")))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(err(format!("base_url {base_url:?} must be http or https")));
                }
                UpstreamKind::OpenAi(OpenAiUpstreamConfig {
                    base_url: base_url.trim_end_matches('/').to_string(),
                    api_key: u.api_key.filter(|k| !k.is_empty()).map(Secret),
                    connect_timeout: Duration::from_millis(u.connect_timeout_ms.unwrap_or(2_000)),
                    first_byte_timeout: Duration::from_millis(
                        u.first_byte_timeout_ms.unwrap_or(60_000),
                    ),
                    idle_timeout: Duration::from_millis(u.idle_timeout_ms.unwrap_or(120_000)),
                })
            }
            "simulated" => {
                if u.base_url.is_some()
                    || u.api_key.is_some()
                    || u.connect_timeout_ms.is_some()
                    || u.first_byte_timeout_ms.is_some()
                    || u.idle_timeout_ms.is_some()
                {
                    return Err(err(
                        "base_url, api_key and timeouts are only valid with kind = \"openai\""
                            .into(),
                    ));
                }
                let d = SimSettings::default();
                let s = SimSettings {
                    latency_ms: u.latency_ms.unwrap_or(d.latency_ms),
                    tokens_per_s: u.tokens_per_s.unwrap_or(d.tokens_per_s),
                    output_tokens: u.output_tokens.unwrap_or(d.output_tokens),
                    reasoning_tokens: u.reasoning_tokens.unwrap_or(d.reasoning_tokens),
                    cached_tokens: u.cached_tokens.unwrap_or(d.cached_tokens),
                    error_rate: u.error_rate.unwrap_or(d.error_rate),
                    error_status: u.error_status.unwrap_or(d.error_status),
                    usage: u.usage.unwrap_or(d.usage),
                    usage_every_chunk: u.usage_every_chunk.unwrap_or(d.usage_every_chunk),
                    usage_style: match u.usage_style.as_deref() {
                        None => d.usage_style,
                        Some(s) => s.parse().map_err(err)?,
                    },
                    fail_after_chunks: u.fail_after_chunks,
                    require_api_key: None,
                };
                s.check().map_err(err)?;
                UpstreamKind::Simulated(s)
            }
            other => {
                return Err(err(format!(
                    "unknown kind {other:?} (expected \"openai\" or \"simulated\")"
                )));
            }
        };
        let provider = u.provider.unwrap_or_else(|| match kind {
            UpstreamKind::Simulated(_) => "simulated".to_string(),
            UpstreamKind::OpenAi(_) => name.clone(),
        });
        upstreams.insert(
            name.clone(),
            UpstreamConfig {
                name,
                provider,
                kind,
            },
        );
    }

    let mut routes: Vec<RouteConfig> = Vec::new();
    for (i, spanned) in raw.routes.iter().enumerate() {
        let span = spanned.span();
        let r = spanned.get_ref();
        let err = |field: &str, m: String| at(span.clone(), format!("routes[{i}]{field}"), m);
        if r.model.is_empty() {
            return Err(err(".model", "must not be empty".into()));
        }
        glob::Pattern::new(&r.model)
            .map_err(|e| err(".model", format!("bad glob {:?}: {e}", r.model)))?;
        if routes.iter().any(|o| o.model == r.model) {
            return Err(err(".model", format!("{:?} is routed twice", r.model)));
        }
        if r.targets.is_empty() {
            return Err(err(".targets", "at least one target is required".into()));
        }
        let mut targets = Vec::new();
        for (j, t) in r.targets.iter().enumerate() {
            if !upstreams.contains_key(t.upstream.get_ref()) {
                let known: Vec<_> = upstreams.keys().cloned().collect();
                return Err(at(
                    t.upstream.span(),
                    format!("routes[{i}].targets[{j}].upstream"),
                    format!(
                        "unknown upstream {:?} (known: {})",
                        t.upstream.get_ref(),
                        known.join(", ")
                    ),
                ));
            }
            let weight = t.weight.unwrap_or(1);
            if weight == 0 {
                return Err(err(
                    &format!(".targets[{j}].weight"),
                    "must be at least 1".into(),
                ));
            }
            targets.push(TargetConfig {
                upstream: t.upstream.get_ref().clone(),
                model: t.model.clone(),
                weight,
            });
        }
        routes.push(RouteConfig {
            model: r.model.clone(),
            targets,
            fallback: r.fallback.iter().map(|f| f.get_ref().clone()).collect(),
            fallback_on: r
                .fallback_on
                .clone()
                .unwrap_or_else(|| DEFAULT_FALLBACK_ON.to_vec()),
        });
    }
    for (i, spanned) in raw.routes.iter().enumerate() {
        for (j, f) in spanned.get_ref().fallback.iter().enumerate() {
            let (span, f) = (f.span(), f.get_ref());
            let exists = routes
                .iter()
                .any(|r| &r.model == f && !r.model.contains(['*', '?', '[']));
            if !exists {
                return Err(at(
                    span,
                    format!("routes[{i}].fallback[{j}]"),
                    format!("{f:?} is not the model of an exact-name route"),
                ));
            }
            if f == &routes[i].model {
                return Err(at(
                    span,
                    format!("routes[{i}].fallback[{j}]"),
                    "a route cannot fall back to itself".into(),
                ));
            }
        }
    }

    let mut consumers: Vec<ConsumerConfig> = Vec::new();
    for (i, spanned) in raw.consumers.iter().enumerate() {
        let span = spanned.span();
        let c = spanned.get_ref();
        let err = |field: &str, m: String| at(span.clone(), format!("consumers[{i}]{field}"), m);
        if c.name.is_empty() {
            return Err(err(".name", "must not be empty".into()));
        }
        if consumers.iter().any(|o| o.name == c.name) {
            return Err(err(".name", format!("{:?} is defined twice", c.name)));
        }
        let mut key_hashes = Vec::new();
        for (j, k) in c.api_keys.iter().enumerate() {
            let key_err = |m: String| at(k.span(), format!("consumers[{i}].api_keys[{j}]"), m);
            let hash = parse_key_hash(k.get_ref()).map_err(key_err)?;
            let taken = consumers.iter().any(|o| o.key_hashes.contains(&hash))
                || key_hashes.contains(&hash);
            if taken {
                return Err(key_err("this key is already assigned".into()));
            }
            key_hashes.push(hash);
        }
        if let Some(models) = &c.models {
            for (j, m) in models.iter().enumerate() {
                glob::Pattern::new(m.get_ref()).map_err(|e| {
                    at(
                        m.span(),
                        format!("consumers[{i}].models[{j}]"),
                        format!("bad glob {:?}: {e}", m.get_ref()),
                    )
                })?;
            }
        }
        consumers.push(ConsumerConfig {
            name: c.name.clone(),
            team: c.team.clone(),
            key_hashes,
            models: c
                .models
                .as_ref()
                .map(|ms| ms.iter().map(|m| m.get_ref().clone()).collect()),
        });
    }

    Ok(Config {
        gateway,
        pipeline,
        query,
        upstreams,
        routes,
        consumers,
    })
}

/// `sha256:<64 hex>` -> digest. The message never repeats the value: a
/// plaintext key pasted here by mistake must not reach a log.
fn parse_key_hash(s: &str) -> std::result::Result<[u8; 32], String> {
    let hex_part = s
        .strip_prefix("sha256:")
        .ok_or("must be \"sha256:<64 hex digits>\" (run `tollgate keys new`); a plaintext key is never accepted")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out)
        .map_err(|_| "must be \"sha256:<64 hex digits>\"".to_string())?;
    Ok(out)
}

fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "gateway".to_string());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_HASH: &str =
        "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    fn env(name: &str) -> Option<String> {
        match name {
            "DEEPSEEK_API_KEY" => Some("sk-\"quoted\"\\x".into()),
            _ => None,
        }
    }

    fn example() -> String {
        format!(
            r#"
[gateway]
listen = "127.0.0.1:8080"

[upstreams.deepseek]
kind = "openai"
base_url = "https://api.deepseek.com/v1/"
api_key = "${{DEEPSEEK_API_KEY}}"   # ${{NOT_SET}} in a comment is fine
connect_timeout_ms = 2000
first_byte_timeout_ms = 60000

[upstreams.sim-qwq]
kind = "simulated"
latency_ms = 0
tokens_per_s = 0
output_tokens = 64
error_rate = 0.0
error_status = 503
usage = true

[[routes]]
model = "deepseek-r1"
targets = [{{ upstream = "deepseek", model = "deepseek-reasoner", weight = 1 }}]
fallback = ["qwq-32b"]
fallback_on = ["connect", "timeout", "5xx", "429"]

[[routes]]
model = "qwq-32b"
targets = [{{ upstream = "sim-qwq", model = "qwq-32b" }}]

[[consumers]]
name = "search-app"
team = "search"
api_keys = ["{KEY_HASH}"]
models = ["deepseek-r1", "qwq-*"]
"#
        )
    }

    #[test]
    fn the_documented_example_parses() {
        let c = Config::parse(&example(), "test", env).unwrap();
        assert_eq!(c.gateway.listen.to_string(), "127.0.0.1:8080");
        let UpstreamKind::OpenAi(ds) = &c.upstreams["deepseek"].kind else {
            panic!("deepseek is an openai upstream");
        };
        assert_eq!(ds.base_url, "https://api.deepseek.com/v1");
        assert_eq!(ds.api_key.as_ref().unwrap().expose(), "sk-\"quoted\"\\x");
        assert_eq!(format!("{:?}", ds.api_key), "Some(Secret(***))");
        assert_eq!(c.routes[0].fallback, vec!["qwq-32b"]);
        assert_eq!(
            c.consumers[0].models.as_deref().unwrap(),
            ["deepseek-r1", "qwq-*"]
        );
        assert_eq!(c.upstreams["sim-qwq"].provider, "simulated");
        assert_eq!(c.upstreams["deepseek"].provider, "deepseek");
    }

    fn error_of(text: &str) -> String {
        Config::parse(text, "t.toml", env).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field_and_the_line() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "unknown key",
                "[gateway]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n",
                &["line 3", "lisen"],
            ),
            (
                "missing env",
                "[upstreams.a]\nkind = \"openai\"\nbase_url = \"http://x\"\napi_key = \"${NOPE}\"\n",
                &["line 4", "NOPE"],
            ),
            (
                "unknown upstream",
                "[upstreams.a]\nkind = \"simulated\"\n\n[[routes]]\nmodel = \"m\"\ntargets = [{ upstream = \"b\" }]\n",
                &["line 6", "routes[0].targets[0].upstream", "\"b\""],
            ),
            (
                "bad fallback",
                "[upstreams.a]\nkind = \"simulated\"\n[[routes]]\nmodel = \"m\"\ntargets = [{ upstream = \"a\" }]\nfallback = [\"zz\"]\n",
                &["line 6", "routes[0].fallback[0]", "zz"],
            ),
            (
                "bad listen",
                "[gateway]\nlisten = \"nowhere\"\n",
                &["line 2", "gateway.listen"],
            ),
            (
                "plaintext key",
                "[[consumers]]\nname = \"a\"\napi_keys = [\"tg-secret-plaintext\"]\n",
                &["line 3", "consumers[0].api_keys[0]"],
            ),
            (
                "sim field on openai",
                "[upstreams.a]\nkind = \"openai\"\nbase_url = \"http://x\"\nerror_rate = 0.5\n",
                &["upstreams.a", "simulated"],
            ),
            (
                "bad trigger",
                "[upstreams.a]\nkind = \"simulated\"\n[[routes]]\nmodel = \"m\"\ntargets = [{ upstream = \"a\" }]\nfallback_on = [\"sometimes\"]\n",
                &["line 6", "sometimes"],
            ),
            (
                "bad error rate",
                "[upstreams.a]\nkind = \"simulated\"\nerror_rate = 2.0\n",
                &["upstreams.a", "error_rate"],
            ),
        ];
        for (name, text, needles) in cases {
            let e = error_of(text);
            for n in *needles {
                assert!(e.contains(n), "{name}: {e:?} lacks {n:?}");
            }
        }
        assert!(
            !error_of("[[consumers]]\nname = \"a\"\napi_keys = [\"tg-secret-plaintext\"]\n")
                .contains("tg-secret")
        );
    }

    #[test]
    fn duplicate_keys_and_names_are_refused() {
        let dup_key = format!(
            "[[consumers]]\nname = \"a\"\napi_keys = [\"{KEY_HASH}\"]\n[[consumers]]\nname = \"b\"\napi_keys = [\"{KEY_HASH}\"]\n"
        );
        assert!(error_of(&dup_key).contains("already assigned"));
        let dup_name = "[[consumers]]\nname = \"a\"\napi_keys = []\n[[consumers]]\nname = \"a\"\napi_keys = []\n";
        assert!(error_of(dup_name).contains("defined twice"));
    }

    #[test]
    fn an_empty_file_is_a_valid_gateway_with_nothing_routed() {
        let c = Config::parse("", "t", env).unwrap();
        assert_eq!(c.gateway.listen.port(), 8080);
        assert!(c.routes.is_empty());
    }

    #[test]
    fn the_shipped_examples_are_valid() {
        let env = |name: &str| {
            matches!(name, "DEEPSEEK_API_KEY" | "TOLLGATE_ADMIN_TOKEN")
                .then(|| "sk-test".to_string())
        };
        for (name, text) in [
            (
                "tollgate.toml",
                include_str!("../../examples/tollgate.toml"),
            ),
            (
                "simulated.toml",
                include_str!("../../examples/simulated.toml"),
            ),
        ] {
            let c = Config::parse(text, name, env).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!c.routes.is_empty() && !c.consumers.is_empty(), "{name}");
        }
    }

    #[test]
    fn comment_detection_respects_strings() {
        assert_eq!(code_part_len("a = \"#x\" # c"), 9);
        assert_eq!(code_part_len("a = '#x'"), 8);
        assert_eq!(code_part_len("a = \"\\\"#\" # c"), 10);
    }
}
