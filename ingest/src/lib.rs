//! Ingest: the usage stream (Kafka, or the local spool in embedded mode) into
//! a Hive-partitioned Parquet lake, exactly once.
//!
//! Not built yet: the gateway's tap currently writes JSON lines (see
//! `tollgate_collector::tap`); the spool, forwarder and Parquet writer land
//! with the usage-pipeline work.
