//! The policy steps between routing and the upstream call. In the order a
//! request meets them:
//!
//! 1. [`screen`]: the content guard (`[[guard]]`) on the request's input
//!    (PII, secrets, deny lists, a moderation upstream), and on the output,
//!    whole or streamed through a bounded holdback.
//! 2. [`quota`]: token, request and dollar rate limits and budgets, keyed
//!    per consumer, team, IP, header, query parameter, cookie or tag:
//!    reserve before the call, settle after it, fall back to a cheaper
//!    model when a limit trips.
//! 3. [`cache`]: the response cache (exact and semantic), in Redis or in
//!    process, looked up before the quota (a hit uses no upstream and
//!    counts against no limit) and filled after an answer.
//! 4. `search` (coming): web search with full-text retrieval, folded into
//!    the request before it goes upstream.
//!
//! The names differ from the query service's own `limits` (per-query
//! resource bounds) and `guard` (read-only SQL) on purpose.

pub mod cache;
pub mod quota;
pub mod screen;
