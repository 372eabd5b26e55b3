//! End-to-end tests: the real `tollgate` binary, its simulator as the
//! upstream, a real Kafka-protocol broker (tansu), real HTTP and Kafka
//! clients, all on 127.0.0.1; and the query engine in process over a lake
//! the ingester wrote.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod broker;
mod canned;
mod harness;

mod errors;
mod exactness;
mod hostile;
mod lifecycle;
mod pipeline;
mod query_engine;
mod routing;
mod streaming;
