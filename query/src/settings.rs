//! What the query service is given: where to listen, who may ask, how far
//! a query may go, and where the lake and the price catalogs are.

use std::net::SocketAddr;
use std::time::Duration;

use tollgate_schemas::PriceCatalog;

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
}

/// A consumer: its name in the ledger and the SHA-256 of each of its keys.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: String,
    pub key_hashes: Vec<[u8; 32]>,
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
