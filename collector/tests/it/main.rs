//! In-process gateway tests: the router from `app(state)` driven with
//! `tower::ServiceExt::oneshot`, simulated upstreams in process, and the
//! tap writing to a spool in a temporary directory that the test reads the
//! events back from. What needs real processes, sockets or a broker is in
//! the workspace's `tests/e2e`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cache;
mod cancel;
mod errors;
mod fallback;
mod guard;
mod harness;
mod limits;
mod observe;
