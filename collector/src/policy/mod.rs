//! The policy steps between routing and the upstream call, each in the
//! place its feature will fill (none is implemented yet, so the module is
//! empty). In the order a request will meet them:
//!
//! 1. `screen`: the content guard on the request's input (PII, secrets,
//!    deny lists), and on the output as it is relayed; block, mask or log.
//! 2. `quota`: token, request and cost rate limits and budgets, keyed per
//!    consumer, team, IP, header or tag: reserve before the call, settle
//!    after it, fall back to a cheaper model when a limit trips.
//! 3. `cache`: the response cache (exact and semantic) in Redis, looked up
//!    after the quota reservation and filled after a successful answer.
//! 4. `search`: web search with full-text retrieval, folded into the
//!    request before it goes upstream.
//!
//! The names differ from the query service's own `limits` (per-query
//! resource bounds) and `guard` (read-only SQL) on purpose.
