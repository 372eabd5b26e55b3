//! Holding a stream back until its first generated content: until then
//! the attempt may still fail over, since nothing has reached the client.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use crate::ledger::tally::{Tally, Usage};
use crate::proxy::failure::Failure;
use crate::proxy::routing::Candidate;
use crate::relay::events::{Events, Step};
use crate::upstream::UpstreamResponse;

/// Most bytes of data events held back while waiting for the first
/// content; past it the attempt fails as `invalid_response`.
const MAX_HELD_BYTES: usize = 256 * 1024;

/// A stream whose first content has arrived, with what came before it.
pub struct Primed {
    pub(super) upstream: UpstreamResponse,
    pub(super) events: Events,
    pub(super) held: Option<Bytes>,
    /// The upstream's body has already ended.
    pub(super) ended: bool,
}

impl Primed {
    /// When the first event with generated content was read.
    pub fn first_content(&self) -> Option<Instant> {
        self.events.first_content
    }
}

/// Reads the stream up to its first content, holding back what came
/// before it; any failure on the way is the attempt's failure, billed by
/// `settle` if the upstream reported or generated anything. Events without
/// data (keep-alive comments) are not held: they mean nothing once the
/// content comes.
pub async fn prime(
    mut upstream: UpstreamResponse,
    mut events: Events,
    candidate: &Candidate,
    settle: impl Fn(&Tally) -> Usage,
) -> Result<Primed, Failure> {
    let mut held = BytesMut::new();
    let fail = |events: &Events, mut failure: Failure| {
        failure.usage = events.failed_usage(&settle);
        failure
    };
    let idle = tokio::time::sleep(upstream.idle_timeout);
    tokio::pin!(idle);
    let ended = 'read: loop {
        let next = tokio::select! {
            biased;
            next = upstream.body.next() => Ok(next),
            () = &mut idle => Err(()),
        };
        idle.as_mut()
            .reset(tokio::time::Instant::now() + upstream.idle_timeout);
        let chunk = match next {
            Err(()) => {
                let stalled = Failure::stalled("the upstream stalled before its first token");
                return Err(fail(&events, stalled));
            }
            Ok(Some(Err(e))) => {
                let message = format!("the upstream stream broke before its first token: {e}");
                return Err(fail(&events, Failure::broken(message)));
            }
            Ok(None) => {
                match events.tail() {
                    Some(Step::Send(bytes)) => held.extend_from_slice(&bytes),
                    Some(Step::Fault(f)) => {
                        return Err(fail(&events, Failure::from_fault(f, Some(200), candidate)));
                    }
                    Some(Step::Skip) | None => {}
                }
                if !events.committed() {
                    let message = "the upstream stream ended before its first token".to_string();
                    return Err(fail(&events, Failure::broken(message)));
                }
                break true;
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        events.parser.push(&chunk);
        loop {
            let ev = match events.parser.next_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(_) => {
                    let broken = Failure::broken("the upstream sent an oversized event".into());
                    return Err(fail(&events, broken));
                }
            };
            let keep = ev.data.is_some();
            match events.process(ev) {
                Step::Send(bytes) if keep => held.extend_from_slice(&bytes),
                Step::Send(_) | Step::Skip => {}
                Step::Fault(f) => {
                    return Err(fail(&events, Failure::from_fault(f, Some(200), candidate)));
                }
            }
            if events.committed() {
                // The rest stays in the parser for the relay.
                break 'read false;
            }
            if held.len() > MAX_HELD_BYTES {
                let message = format!(
                    "{} sent over {MAX_HELD_BYTES} bytes of events without generated content",
                    candidate.upstream.name()
                );
                return Err(fail(&events, Failure::invalid(message)));
            }
        }
    };
    Ok(Primed {
        upstream,
        events,
        held: (!held.is_empty()).then(|| held.freeze()),
        ended,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    use crate::upstream::Upstream;
    use crate::upstream::simulate::SimSettings;

    fn settle(t: &Tally) -> Usage {
        t.settle(None).0
    }

    fn candidate() -> Candidate {
        Candidate {
            upstream: Arc::new(Upstream::simulated("up", "test", SimSettings::default())),
            model: "served".into(),
            route_model: "asked".into(),
        }
    }

    /// An upstream response whose body yields `parts` (`None` = the body
    /// breaks there), each after `gap`.
    fn upstream(parts: Vec<Option<&'static str>>, gap: Duration) -> UpstreamResponse {
        let body = futures_util::stream::iter(parts).then(move |p| async move {
            tokio::time::sleep(gap).await;
            p.map(|s| Bytes::from_static(s.as_bytes()))
                .ok_or_else(|| "reset".to_string())
        });
        UpstreamResponse {
            status: 200,
            content_type: crate::upstream::MediaType::of(None),
            body: Box::pin(body),
            idle_timeout: Duration::from_millis(200),
        }
    }

    async fn primed(parts: Vec<Option<&'static str>>) -> Result<Primed, Failure> {
        let events = Events::new("asked", false);
        prime(
            upstream(parts, Duration::ZERO),
            events,
            &candidate(),
            settle,
        )
        .await
    }

    const ROLE: &str = "data: {\"model\":\"served\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
    const HI: &str = "data: {\"model\":\"served\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n";

    #[tokio::test]
    async fn data_events_before_the_first_content_are_held_and_renamed() {
        let p = primed(vec![
            Some(ROLE),
            Some(": ka\n\n"),
            Some(HI),
            Some("data: [DONE]\n\n"),
        ])
        .await
        .ok()
        .unwrap();
        let held = String::from_utf8(p.held.clone().unwrap().to_vec()).unwrap();
        assert_eq!(held.matches("\"model\":\"asked\"").count(), 2, "{held}");
        assert!(
            !held.contains(": ka") && !held.contains("[DONE]"),
            "keep-alives are not held, and nothing past the first content: {held}"
        );
        assert!(p.first_content().is_some() && !p.ended);
    }

    #[tokio::test]
    async fn any_failure_before_the_first_content_fails_the_attempt() {
        let cases: Vec<(Vec<Option<&'static str>>, &str)> = vec![
            (
                vec![Some(
                    "data: {\"error\":{\"message\":\"x\",\"code\":502}}\n\n",
                )],
                "5xx",
            ),
            (
                vec![
                    Some(ROLE),
                    Some(
                        "event: error\ndata: {\"message\":\"busy\",\"type\":\"rate_limit_error\"}\n\n",
                    ),
                ],
                "429",
            ),
            (vec![Some(ROLE), None], "stream_error"),
            (vec![Some(ROLE)], "stream_error"),
            (vec![Some("<html>oops</html>")], "stream_error"),
            (
                vec![Some("{\"error\":{\"message\":\"no\",\"code\":503}}")],
                "5xx",
            ),
        ];
        for (parts, label) in cases {
            let shown = format!("{parts:?}");
            let f = primed(parts)
                .await
                .err()
                .unwrap_or_else(|| panic!("{shown}"));
            assert_eq!(f.label, label, "{shown}");
            assert!(
                f.usage.is_none(),
                "{shown}: nothing generated, nothing billed"
            );
        }
        let stalled = prime(
            upstream(vec![Some(ROLE), Some(HI)], Duration::from_millis(500)),
            Events::new("asked", false),
            &candidate(),
            settle,
        )
        .await;
        assert_eq!(stalled.err().map(|f| f.label), Some("timeout"));
    }

    #[tokio::test]
    async fn a_finish_commits_a_stream_without_content_and_done_alone_does_not() {
        let fin =
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"content_filter\"}]}";
        let both = format!("{fin}\n\ndata: [DONE]");
        let p = primed(vec![Some(ROLE), Some(both.leak())])
            .await
            .ok()
            .unwrap();
        assert!(
            p.first_content().is_none() && !p.ended,
            "the rest is the relay's"
        );
        let ended = primed(vec![Some(ROLE), Some(fin)]).await.ok().unwrap();
        assert!(ended.ended);
        let held = ended.held.unwrap();
        assert!(
            held.ends_with(b"\"content_filter\"}]}\n\n"),
            "the last event is terminated: {held:?}"
        );
        let done_only = primed(vec![Some(ROLE), Some("data: [DONE]\n\n")]).await;
        assert_eq!(done_only.err().map(|f| f.label), Some("stream_error"));
    }
}
