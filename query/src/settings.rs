//! What the query service is given: where to listen, who may ask, how far
//! a query may go, and where the lake and the price catalogs are. The
//! `[query]` section of the config file is validated here
//! ([`QueryConfig`]); the rest ([`QuerySettings`]) comes from the other
//! parts' sections: the lake from `[pipeline]`, tenants from
//! `[[consumers]]`, the priced-with catalog from `[gateway]`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tollgate_schemas::PriceCatalog;
use tollgate_schemas::config::{Invalid, Secret};
use toml::Spanned;

#[derive(Debug, Clone)]
pub struct QuerySettings {
    pub listen: SocketAddr,
    /// The PostgreSQL wire endpoint; `None` leaves it off.
    pub pg_listen: Option<SocketAddr>,
    /// Sees every row; `None` lets only consumer keys in.
    pub admin_token: Option<String>,
    pub tenants: Vec<Tenant>,
    /// A local directory or `s3://bucket/prefix`.
    pub lake: String,
    pub lake_options: Vec<(String, String)>,
    /// The catalog events are priced with, then any others to reprice with;
    /// versions are unique.
    pub catalogs: Vec<PriceCatalog>,
    pub limits: Limits,
    /// Parquet footers kept between queries, so a scan
    /// does not decode every file's metadata again.
    pub cache_bytes: usize,
    /// The streams each query is split into. Twice the service's threads,
    /// so one stream's file reads (on the blocking pool) overlap another's
    /// decoding (measured: about 5% off the full-lake reports).
    pub partitions: usize,
    /// Browser origins allowed to call the HTTP API (a dashboard, a BI
    /// tool's web page); empty sends no CORS headers, `*` allows any.
    pub cors_origins: Vec<String>,
    /// The gateway's rate limits and budgets, for the `rate_limits` and
    /// `budgets` tables.
    pub rules: crate::rules::LimitRules,
    /// `None`: no alerts are evaluated (the alerts table still lists what
    /// the lake holds).
    pub alerts: Option<crate::alerts::config::AlertSettings>,
}

/// A consumer: its name in the ledger and the SHA-256 of each of its keys.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: String,
    pub key_hashes: Vec<[u8; 32]>,
    /// Decides which team budgets and rules the consumer sees.
    pub team: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// DataFusion's memory pool; operators that would exceed it fail.
    pub memory_bytes: usize,
    /// The process's resident size at which running queries are cancelled:
    /// a backstop for allocations the pool does not see.
    pub max_rss_bytes: u64,
    pub timeout: Duration,
    pub max_result_rows: usize,
    pub max_result_bytes: usize,
    pub max_concurrent: usize,
    /// Rows a table function such as `generate_series` may produce.
    pub max_generated_rows: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 512 << 20,
            max_rss_bytes: 2 << 30,
            timeout: Duration::from_secs(30),
            max_result_rows: 1_000_000,
            max_result_bytes: 256 << 20,
            max_concurrent: 4,
            max_generated_rows: 10_000_000,
        }
    }
}

/// `[query]`, validated: SQL and reports over the lake (`tollgate query`,
/// and part of `tollgate serve` when present).
#[derive(Debug, Clone)]
pub struct QueryConfig {
    pub listen: SocketAddr,
    /// The PostgreSQL wire endpoint; `None` leaves it off.
    pub pg_listen: Option<SocketAddr>,
    /// Sees every row; unset or empty lets only consumer keys in.
    pub admin_token: Option<Secret>,
    /// More catalogs to reprice with (`catalog=`), besides the gateway's.
    pub catalogs: Vec<PathBuf>,
    /// Threads of the service's runtime.
    pub threads: usize,
    pub limits: Limits,
    /// Parquet footers kept between queries, bytes.
    pub cache_bytes: usize,
    /// See [`QuerySettings::cors_origins`].
    pub cors_origins: Vec<String>,
}

/// `[query]` as written; sizes in MiB, durations in ms.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuery {
    listen: Option<SocketAddr>,
    pg_listen: Option<Spanned<String>>,
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
    #[serde(default)]
    cors_origins: Vec<Spanned<String>>,
}

impl QueryConfig {
    /// Defaults for what is not written; values below their floor are
    /// raised to it. `pg_listen = "off"` turns the PostgreSQL endpoint off.
    pub fn from_raw(q: RawQuery) -> Result<Self, Invalid> {
        let pg_listen = match q.pg_listen {
            None => Some(SocketAddr::from(([127, 0, 0, 1], 5433))),
            Some(a) if a.get_ref() == "off" => None,
            Some(a) => Some(a.get_ref().parse().map_err(|_| {
                Invalid::at(
                    a.span(),
                    "query.pg_listen",
                    format!(
                        "{:?} is not an address (127.0.0.1:5433) or \"off\"",
                        a.get_ref()
                    ),
                )
            })?),
        };
        let mut cors_origins = Vec::with_capacity(q.cors_origins.len());
        for origin in q.cors_origins {
            let o = origin.get_ref();
            let scheme = o.starts_with("http://") || o.starts_with("https://");
            let valid = o == "*"
                || (scheme
                    && !o.ends_with('/')
                    && o.bytes().all(|b| b.is_ascii_graphic())
                    && o.split("://").nth(1).is_some_and(|host| !host.is_empty()));
            if !valid {
                return Err(Invalid::at(
                    origin.span(),
                    "query.cors_origins",
                    format!(
                        "{o:?} is not an origin (scheme://host[:port], no path, e.g. \"https://grafana.example.com\") or \"*\""
                    ),
                ));
            }
            cors_origins.push(o.clone());
        }
        Ok(Self {
            cors_origins,
            listen: q
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8001))),
            pg_listen,
            admin_token: q.admin_token.and_then(Secret::new),
            catalogs: q.catalogs,
            threads: q.threads.unwrap_or(2).max(1),
            limits: Limits {
                memory_bytes: q.memory_mb.unwrap_or(512).max(16) << 20,
                max_rss_bytes: q.max_rss_mb.unwrap_or(2048).max(64) << 20,
                timeout: Duration::from_millis(q.timeout_ms.unwrap_or(30_000).max(1)),
                max_result_rows: q.max_result_rows.unwrap_or(1_000_000).max(1),
                max_result_bytes: q.max_result_mb.unwrap_or(256).max(1) << 20,
                max_concurrent: q.max_concurrent.unwrap_or(4).max(1),
                max_generated_rows: q.max_generated_rows.unwrap_or(10_000_000).max(1),
            },
            cache_bytes: q.cache_mb.unwrap_or(256) << 20,
        })
    }

    /// The service's settings, with what other sections say: the lake, the
    /// tenants, and the catalogs (the priced-with one first, then
    /// [`Self::catalogs`] loaded).
    pub fn settings(
        &self,
        lake: String,
        lake_options: Vec<(String, String)>,
        tenants: Vec<Tenant>,
        catalogs: Vec<PriceCatalog>,
        rules: crate::rules::LimitRules,
    ) -> QuerySettings {
        QuerySettings {
            listen: self.listen,
            pg_listen: self.pg_listen,
            admin_token: self.admin_token.as_ref().map(|s| s.expose().to_string()),
            tenants,
            lake,
            lake_options,
            catalogs,
            limits: self.limits.clone(),
            cache_bytes: self.cache_bytes,
            partitions: self.threads * 2,
            cors_origins: self.cors_origins.clone(),
            rules,
            alerts: None,
        }
    }
}
