//! The answer as server-sent events: one chunk per token, the finish
//! chunk, usage when asked for, `[DONE]`; paced, and broken half-way when
//! the settings say so.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::Response;
use futures_util::stream;

use super::plan::{Plan, Sim, error};

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Kind {
    Chat,
    Completion,
}

/// Streams one chunk per token, then the finish chunk, the usage chunk when
/// asked for, and `[DONE]`.
pub(super) fn stream_response(sim: Arc<Sim>, plan: Plan, kind: Kind) -> Response {
    let gap = sim.token_gap();
    let fail_after = sim.settings.fail_after_chunks.map(u64::from);
    let every = sim.settings.usage_every_chunk && plan.usage;
    // Step n: 0..output = tokens, output = finish, output+1 = usage, then DONE.
    let state = (sim, plan, 0u64);
    let body = stream::unfold(state, move |(sim, plan, n)| async move {
        if fail_after.is_some_and(|f| n >= f) {
            // Let what was sent reach the wire before the connection drops,
            // as with a real upstream that dies mid-generation.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let err = std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "simulated stream failure",
            );
            return Some((Err(err), (sim, plan, u64::MAX)));
        }
        if n == u64::MAX {
            return None;
        }
        let mut out = String::with_capacity(256);
        let head = |out: &mut String| {
            let (prefix, object) = match kind {
                Kind::Chat => ("chatcmpl", "chat.completion.chunk"),
                Kind::Completion => ("cmpl", "text_completion"),
            };
            let _ = write!(
                out,
                "data: {{\"id\":\"{prefix}-{}\",\"object\":\"{object}\",\"created\":{},\"model\":{},\"choices\":",
                plan.id, plan.created, plan.model_json
            );
        };
        let next = if n < plan.output {
            if n > 0
                && let Some(gap) = gap
            {
                tokio::time::sleep(gap).await;
            }
            let w = plan.word_json(n);
            head(&mut out);
            match kind {
                Kind::Chat if n < plan.reasoning => {
                    let role = if n == 0 {
                        "\"role\":\"assistant\",\"content\":null,"
                    } else {
                        ""
                    };
                    let _ = write!(
                        out,
                        "[{{\"index\":0,\"delta\":{{{role}\"reasoning_content\":\"{w}\"}},\"finish_reason\":null}}]"
                    );
                }
                Kind::Chat => {
                    let role = if n == 0 {
                        "\"role\":\"assistant\","
                    } else {
                        ""
                    };
                    let _ = write!(
                        out,
                        "[{{\"index\":0,\"delta\":{{{role}\"content\":\"{w}\"}},\"finish_reason\":null}}]"
                    );
                }
                Kind::Completion => {
                    let _ = write!(
                        out,
                        "[{{\"index\":0,\"text\":\"{w}\",\"finish_reason\":null}}]"
                    );
                }
            }
            if every {
                let _ = write!(out, ",\"usage\":{}", sim.usage_json(&plan, n + 1));
            }
            out.push_str("}\n\n");
            n + 1
        } else if n == plan.output {
            head(&mut out);
            match kind {
                Kind::Chat => {
                    let _ = write!(
                        out,
                        "[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"{}\"}}]",
                        plan.finish
                    );
                }
                Kind::Completion => {
                    let _ = write!(
                        out,
                        "[{{\"index\":0,\"text\":\"\",\"finish_reason\":\"{}\"}}]",
                        plan.finish
                    );
                }
            }
            if every {
                let _ = write!(out, ",\"usage\":{}", sim.usage_json(&plan, plan.output));
            }
            out.push_str("}\n\n");
            if plan.usage { n + 1 } else { n + 2 }
        } else if n == plan.output + 1 {
            head(&mut out);
            let _ = write!(
                out,
                "[],\"usage\":{}}}\n\n",
                sim.usage_json(&plan, plan.output)
            );
            n + 1
        } else if n == plan.output + 2 {
            out.push_str("data: [DONE]\n\n");
            u64::MAX
        } else {
            return None;
        };
        Some((Ok(Bytes::from(out)), (sim, plan, next)))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "response build failed",
                "server_error",
            )
        })
}
