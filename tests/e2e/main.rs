//! End-to-end tests: the real `tollgate` binary, its simulator as the
//! upstream, real HTTP clients, all on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

mod errors;
mod hostile;
mod lifecycle;
mod routing;
mod streaming;
