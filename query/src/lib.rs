//! Query: SQL over the Parquet lake with DataFusion, over HTTP and the
//! PostgreSQL wire protocol, plus the cost and ROI reports.
//!
//! One path for every query, whichever surface it came from:
//! [`access`] (who is asking) -> [`engine`] (that principal's session, whose
//! `usage` table only holds its rows) -> [`guard`] (read-only, checked on the
//! statement and again on the plan) -> [`limits`] (concurrency, timeout,
//! result size, memory) -> a surface: [`http`] (with its [`openapi`]
//! description, and the [`dashboard`] at `/`) or [`pg`]. [`tables`] builds what a session sees, with
//! [`generators`] (bounded table functions); [`reports`] are fixed
//! queries with exact money. [`metrics`] counts every query by surface
//! and SQLSTATE. [`settings`] is the `[query]` section and what the service
//! is given; [`service`] starts both surfaces and [`alerts`], which reads
//! the ledger for budget, forecast, anomaly and pipeline alerts.

pub mod access;
pub mod alerts;
pub mod dashboard;
pub mod engine;
pub mod generators;
pub mod guard;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod pg;
pub mod reports;
pub mod rules;
pub mod service;
pub mod settings;
pub mod tables;
pub mod tenant;

pub use access::Principal;
pub use engine::Engine;
pub use service::QueryService;
pub use settings::{Limits, QueryConfig, QuerySettings, Tenant};

/// What a query can fail with; each kind maps to one HTTP status and one
/// SQLSTATE.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    Unauthenticated(String),
    /// A name the server does not have (a setting).
    #[error("{0}")]
    UndefinedObject(String),
    /// A prepared statement the connection does not have.
    #[error("{0}")]
    InvalidStatementName(String),
    /// A prepared statement name the connection already uses.
    #[error("{0}")]
    DuplicateStatementName(String),
    /// A cursor the connection does not have.
    #[error("{0}")]
    InvalidCursorName(String),
    /// More open cursors than a connection may hold.
    #[error("{0}")]
    TooManyCursors(String),
    #[error("{0}")]
    ReadOnly(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Sql(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("the query ran longer than {0} ms and was cancelled")]
    Timeout(u64),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Resources(String),
    #[error("{0}")]
    Internal(String),
}

impl QueryError {
    /// The SQLSTATE a PostgreSQL client sees.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            QueryError::Unauthenticated(_) => "28P01",
            QueryError::ReadOnly(_) => "25006",
            QueryError::Forbidden(_) => "42501",
            QueryError::BadRequest(_) | QueryError::Sql(_) => "42601",
            QueryError::NotFound(_) => "42P01",
            QueryError::UndefinedObject(_) => "42704",
            QueryError::InvalidStatementName(_) => "26000",
            QueryError::DuplicateStatementName(_) => "42P05",
            QueryError::TooManyCursors(_) => "53400",
            QueryError::InvalidCursorName(_) => "34000",
            QueryError::NotAcceptable(_) => "0A000",
            QueryError::Timeout(_) => "57014",
            QueryError::TooLarge(_) => "54000",
            QueryError::Busy(_) => "53300",
            QueryError::Resources(_) => "53200",
            QueryError::Internal(_) => "XX000",
        }
    }

    /// DataFusion's errors, sorted into what the client did and what the
    /// server ran out of.
    pub fn from_datafusion(e: datafusion::error::DataFusionError) -> QueryError {
        QueryError::sort(&e)
    }

    /// [`Self::from_datafusion`] for an error held by reference (the
    /// PostgreSQL wire hands errors over boxed).
    pub fn sort(e: &datafusion::error::DataFusionError) -> QueryError {
        use datafusion::error::DataFusionError as E;
        match e.find_root() {
            E::ResourcesExhausted(m) => QueryError::Resources(format!(
                "the query needs more memory than the limit allows: {m}"
            )),
            E::Execution(m) if m.starts_with(tables::TOO_MANY_ROWS) => {
                QueryError::TooLarge(m.clone())
            }
            E::Execution(m) if m.starts_with(pg::server::UNRECOGNIZED) => {
                QueryError::UndefinedObject(m.clone())
            }
            E::Execution(m) if m.starts_with(pg::server::ONLY_UTC) => {
                QueryError::NotAcceptable(m.clone())
            }
            _ => QueryError::Sql(e.strip_backtrace()),
        }
    }
}
