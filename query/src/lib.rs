//! Query: DataFusion over the Parquet lake, SQL over HTTP and the PostgreSQL
//! wire protocol, cost and ROI reports, budgets and alerts.
//!
//! Not built yet: it lands after the ingest crate produces the lake.
