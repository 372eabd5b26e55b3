//! One upstream: its transport (a pooled HTTP client, or the simulator's
//! router in-process), sending an attempt, and what comes back.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use http::HeaderValue;
use tower::ServiceExt;

use tollgate_schemas::config::Secret;

use super::Endpoint;
use super::config::{OpenAiUpstreamConfig, UpstreamConfig, UpstreamKind};
use crate::ledger::tally::Estimated;
use crate::upstream::simulate::{self, SimSettings};

pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

pub struct UpstreamResponse {
    pub status: u16,
    pub content_type: MediaType,
    pub body: BodyStream,
    /// Longest silence allowed between two body chunks.
    pub idle_timeout: Duration,
}

/// The media type of a response (`type/subtype`, parameters dropped),
/// copied out of its head: a `HeaderValue` shares the HTTP client's read
/// buffer and would keep it from being reused for as long as it lives.
#[derive(Clone, Copy)]
pub struct MediaType {
    buf: [u8; Self::MAX],
    len: u8,
}

impl MediaType {
    const MAX: usize = 64;

    pub fn of(value: Option<&HeaderValue>) -> Self {
        let value = value.map_or(&b""[..], HeaderValue::as_bytes);
        let end = memchr::memchr(b';', value).unwrap_or(value.len());
        let essence = value[..end].trim_ascii();
        let len = essence.len().min(Self::MAX);
        let mut buf = [0; Self::MAX];
        buf[..len].copy_from_slice(&essence[..len]);
        MediaType {
            buf,
            len: len as u8,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    /// `application/json` or any `+json` type, in any case.
    pub fn is_json(&self) -> bool {
        let m = self.as_bytes();
        m.eq_ignore_ascii_case(b"application/json")
            || (m.len() >= 5 && m[m.len() - 5..].eq_ignore_ascii_case(b"+json"))
    }
}

impl std::fmt::Display for MediaType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.as_bytes() {
            b"" => f.write_str("no content type"),
            m => {
                let text = String::from_utf8_lossy(m).to_ascii_lowercase();
                f.write_str(&crate::error::shown(&text))
            }
        }
    }
}

/// Why an attempt got no response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    Connect(String),
    Timeout(String),
    Other(String),
}

pub struct Upstream {
    name: String,
    provider: String,
    transport: Transport,
    estimates: Estimates,
}

/// Attempts whose tokens were estimated, by reason.
#[derive(Default)]
struct Estimates {
    no_usage: AtomicU64,
    unreadable: AtomicU64,
    total_only: AtomicU64,
    partial: AtomicU64,
    /// Whether the upstream's unreadable usage was already logged.
    warned: AtomicBool,
}

enum Transport {
    Http {
        /// One pre-parsed URL per endpoint (parsing per request is costly).
        urls: Box<[reqwest::Url; 4]>,
        api_key: Option<Secret>,
        client: reqwest::Client,
        first_byte_timeout: Duration,
        idle_timeout: Duration,
    },
    Simulated(axum::Router),
}

const SIMULATED_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Result<Self, UpstreamError> {
        match &config.kind {
            UpstreamKind::OpenAi(c) => Self::http(&config.name, &config.provider, c),
            UpstreamKind::Simulated(s) => {
                Ok(Self::simulated(&config.name, &config.provider, s.clone()))
            }
        }
    }

    pub fn simulated(name: &str, provider: &str, settings: SimSettings) -> Self {
        Self {
            name: name.to_string(),
            provider: provider.to_string(),
            transport: Transport::Simulated(simulate::router(settings)),
            estimates: Estimates::default(),
        }
    }

    fn http(name: &str, provider: &str, c: &OpenAiUpstreamConfig) -> Result<Self, UpstreamError> {
        let client = reqwest::Client::builder()
            .connect_timeout(c.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            name: name.to_string(),
            provider: provider.to_string(),
            transport: Transport::Http {
                urls: Box::new(endpoint_urls(&c.base_url)?),
                api_key: c.api_key.clone(),
                client,
                first_byte_timeout: c.first_byte_timeout,
                idle_timeout: c.idle_timeout,
            },
            estimates: Estimates::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// Counts an attempt whose tokens were estimated. An estimate made
    /// while the upstream did send usage is logged, once per upstream: it
    /// means a usage shape this gateway does not read yet.
    pub fn estimated(&self, why: Estimated) {
        let counter = match why {
            Estimated::NoUsage => &self.estimates.no_usage,
            Estimated::Unreadable => &self.estimates.unreadable,
            Estimated::TotalOnly => &self.estimates.total_only,
            Estimated::Partial => &self.estimates.partial,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if why != Estimated::NoUsage && !self.estimates.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                upstream = self.name,
                reason = why.as_str(),
                "the upstream sent usage this gateway cannot read; its tokens are estimated \
                 (logged once per upstream, counted in tollgate_usage_estimated_total)"
            );
        }
    }

    /// `(reason, count)` of `tollgate_usage_estimated_total` for this upstream.
    pub fn estimate_counts(&self) -> [(Estimated, u64); 4] {
        let e = &self.estimates;
        [
            (Estimated::NoUsage, e.no_usage.load(Ordering::Relaxed)),
            (Estimated::Unreadable, e.unreadable.load(Ordering::Relaxed)),
            (Estimated::TotalOnly, e.total_only.load(Ordering::Relaxed)),
            (Estimated::Partial, e.partial.load(Ordering::Relaxed)),
        ]
    }

    /// The upstream's key, so responses can be scrubbed of it.
    pub fn secret(&self) -> Option<&str> {
        match &self.transport {
            Transport::Http { api_key, .. } => api_key.as_ref().map(Secret::expose),
            Transport::Simulated(_) => None,
        }
    }

    /// Where the upstream listens (host, port), for traces; `None` for
    /// the simulator.
    pub fn address(&self) -> Option<(&str, u16)> {
        match &self.transport {
            Transport::Http { urls, .. } => {
                let url = &urls[0];
                Some((url.host_str()?, url.port_or_known_default()?))
            }
            Transport::Simulated(_) => None,
        }
    }

    /// Sends one attempt, with `trace` (W3C trace context headers), and
    /// waits for the response head.
    pub async fn send(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        trace: &[(&'static str, http::HeaderValue)],
    ) -> Result<UpstreamResponse, SendError> {
        match &self.transport {
            Transport::Http {
                urls,
                api_key,
                client,
                first_byte_timeout,
                idle_timeout,
            } => {
                let mut req = client
                    .post(urls[endpoint as usize].clone())
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(body);
                if let Some(key) = api_key {
                    req = req.bearer_auth(key.expose());
                }
                for (name, value) in trace {
                    req = req.header(*name, value.clone());
                }
                let resp = match tokio::time::timeout(*first_byte_timeout, req.send()).await {
                    Err(_) => {
                        return Err(SendError::Timeout(format!(
                            "no response within {} ms",
                            first_byte_timeout.as_millis()
                        )));
                    }
                    Ok(Err(e)) => return Err(classify(&e)),
                    Ok(Ok(r)) => r,
                };
                Ok(UpstreamResponse {
                    status: resp.status().as_u16(),
                    content_type: MediaType::of(resp.headers().get(http::header::CONTENT_TYPE)),
                    body: resp.bytes_stream().map_err(|e| describe(&e)).boxed(),
                    idle_timeout: *idle_timeout,
                })
            }
            Transport::Simulated(router) => {
                let mut req = http::Request::post(format!("/v1/{}", endpoint.path()))
                    .header(http::header::CONTENT_TYPE, "application/json");
                for (name, value) in trace {
                    req = req.header(*name, value.clone());
                }
                let req = req
                    .body(Body::from(body))
                    .map_err(|e| SendError::Other(e.to_string()))?;
                let resp = router
                    .clone()
                    .oneshot(req)
                    .await
                    .map_err(|e| SendError::Other(e.to_string()))?;
                let status = resp.status().as_u16();
                let content_type = MediaType::of(resp.headers().get(http::header::CONTENT_TYPE));
                let body = resp
                    .into_body()
                    .into_data_stream()
                    .map_err(|e| e.to_string())
                    .boxed();
                Ok(UpstreamResponse {
                    status,
                    content_type,
                    body,
                    idle_timeout: SIMULATED_IDLE_TIMEOUT,
                })
            }
        }
    }
}

fn endpoint_urls(base: &str) -> Result<[reqwest::Url; 4], UpstreamError> {
    let url = |e: Endpoint| {
        let text = format!("{base}/{}", e.path());
        reqwest::Url::parse(&text).map_err(|err| UpstreamError::Url(format!("{text}: {err}")))
    };
    Ok([
        url(Endpoint::ChatCompletions)?,
        url(Endpoint::Completions)?,
        url(Endpoint::Embeddings)?,
        url(Endpoint::Moderations)?,
    ])
}

/// Why an upstream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("bad URL {0}")]
    Url(String),
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

fn classify(e: &reqwest::Error) -> SendError {
    if e.is_connect() {
        SendError::Connect(describe(e))
    } else if e.is_timeout() {
        SendError::Timeout(describe(e))
    } else {
        SendError::Other(describe(e))
    }
}

/// The error and its causes on one line (reqwest's own text stops at the
/// outermost layer, which rarely says what went wrong).
fn describe(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
