//! `[telemetry]`: what the gateway tells the platform team live. Prometheus
//! metrics are on by default (`GET /metrics`); OpenTelemetry export over
//! OTLP is off until an endpoint is configured here or in the standard
//! `OTEL_EXPORTER_OTLP_*` environment variables
//! (<https://opentelemetry.io/docs/specs/otel/protocol/exporter/>).

use std::collections::BTreeMap;

use serde::Deserialize;
use tollgate_schemas::config::{Invalid, Secret};
use toml::Spanned;

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Request metrics on `/metrics`; off only to measure what they cost
    /// (the pipeline's counters stay).
    pub prometheus: bool,
    /// The collector's base URL (`http://host:4318` for HTTP, whose
    /// `/v1/traces` and `/v1/metrics` are appended; `http://host:4317` for
    /// gRPC). `None`: the `OTEL_EXPORTER_OTLP_*` variables decide.
    pub otlp_endpoint: Option<String>,
    /// `None`: `OTEL_EXPORTER_OTLP_PROTOCOL`, else HTTP/protobuf.
    pub otlp_protocol: Option<OtlpProtocol>,
    /// Sent with every export (an API key for a hosted collector); never logged.
    pub otlp_headers: BTreeMap<String, Secret>,
    /// `None`: `OTEL_SERVICE_NAME`, else `tollgate`.
    pub service_name: Option<String>,
    /// Prompt and completion text on spans (`gen_ai.input.messages`,
    /// `gen_ai.output.messages`); off by default, as the conventions ask.
    pub capture_content: bool,
    /// Spans waiting for export; past it they are dropped and counted.
    /// `None`: `OTEL_BSP_MAX_QUEUE_SIZE`, else 2048.
    pub max_queue_spans: Option<usize>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            prometheus: true,
            otlp_endpoint: None,
            otlp_protocol: None,
            otlp_headers: BTreeMap::new(),
            service_name: None,
            capture_content: false,
            max_queue_spans: None,
        }
    }
}

/// OTLP's two transports, by their `OTEL_EXPORTER_OTLP_PROTOCOL` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    HttpProtobuf,
    Grpc,
}

impl OtlpProtocol {
    /// `http/protobuf` or `grpc`; `None` for anything else (`http/json` is
    /// not offered).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "http/protobuf" => Some(Self::HttpProtobuf),
            "grpc" => Some(Self::Grpc),
            _ => None,
        }
    }
}

/// `[telemetry]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    prometheus: Option<bool>,
    otlp_endpoint: Option<Spanned<String>>,
    otlp_protocol: Option<Spanned<String>>,
    #[serde(default)]
    otlp_headers: BTreeMap<String, String>,
    service_name: Option<Spanned<String>>,
    capture_content: Option<bool>,
    max_queue_spans: Option<Spanned<usize>>,
}

pub fn validate(t: RawTelemetry) -> Result<TelemetryConfig, Invalid> {
    let d = TelemetryConfig::default();
    let otlp_endpoint = match t.otlp_endpoint {
        None => None,
        Some(s) => {
            let url = s.get_ref().trim();
            let ok = (url.starts_with("http://") || url.starts_with("https://"))
                && url.parse::<http::Uri>().is_ok_and(|u| u.host().is_some());
            if !ok {
                return Err(Invalid::at(
                    s.span(),
                    "telemetry.otlp_endpoint",
                    format!("{url:?} is not an http:// or https:// URL"),
                ));
            }
            Some(url.trim_end_matches('/').to_string())
        }
    };
    let otlp_protocol = match t.otlp_protocol {
        None => None,
        Some(p) => Some(OtlpProtocol::parse(p.get_ref()).ok_or_else(|| {
            Invalid::at(
                p.span(),
                "telemetry.otlp_protocol",
                format!("{:?}: expected \"http/protobuf\" or \"grpc\"", p.get_ref()),
            )
        })?),
    };
    let mut otlp_headers = BTreeMap::new();
    for (name, value) in t.otlp_headers {
        let path = format!("telemetry.otlp_headers.{name}");
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(Invalid::key(path, "is not an HTTP header name"));
        }
        if http::HeaderValue::from_str(&value).is_err() {
            return Err(Invalid::key(path, "is not a valid HTTP header value"));
        }
        let Some(secret) = Secret::new(value) else {
            return Err(Invalid::key(path, "must not be empty"));
        };
        otlp_headers.insert(name.to_ascii_lowercase(), secret);
    }
    let service_name = match t.service_name {
        None => None,
        Some(s) if s.get_ref().trim().is_empty() => {
            return Err(Invalid::at(
                s.span(),
                "telemetry.service_name",
                "must not be empty",
            ));
        }
        Some(s) => Some(s.into_inner()),
    };
    let max_queue_spans = match t.max_queue_spans {
        None => None,
        Some(n) if *n.get_ref() == 0 || *n.get_ref() > 1 << 20 => {
            return Err(Invalid::at(
                n.span(),
                "telemetry.max_queue_spans",
                "must be between 1 and 1048576",
            ));
        }
        Some(n) => Some(n.into_inner()),
    };
    if let (Some(OtlpProtocol::Grpc), Some(url)) = (otlp_protocol, &otlp_endpoint)
        && url.starts_with("https://")
    {
        return Err(Invalid::key(
            "telemetry.otlp_endpoint",
            "gRPC export is plaintext only: use an http:// collector, or otlp_protocol = \"http/protobuf\" for https://",
        ));
    }
    Ok(TelemetryConfig {
        prometheus: t.prometheus.unwrap_or(d.prometheus),
        otlp_endpoint,
        otlp_protocol,
        otlp_headers,
        service_name,
        capture_content: t.capture_content.unwrap_or(false),
        max_queue_spans,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TelemetryConfig, Invalid> {
        validate(toml::from_str(text).map_err(|e| Invalid::key("toml", e.to_string()))?)
    }

    #[test]
    fn an_empty_section_keeps_prometheus_on_and_export_off() {
        let t = parse("").unwrap();
        assert!(t.prometheus && t.otlp_endpoint.is_none() && !t.capture_content);
    }

    #[test]
    fn the_documented_keys_are_read() {
        let t = parse(
            r#"otlp_endpoint = "http://127.0.0.1:4318/"
otlp_protocol = "grpc"
service_name = "gw"
capture_content = true
otlp_headers = { "X-Api-Key" = "k" }"#,
        )
        .unwrap();
        assert_eq!(t.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4318"));
        assert_eq!(t.otlp_protocol, Some(OtlpProtocol::Grpc));
        assert_eq!(t.service_name.as_deref(), Some("gw"));
        assert!(t.capture_content);
        assert_eq!(t.otlp_headers["x-api-key"].expose(), "k");
    }

    #[test]
    fn a_bad_endpoint_protocol_or_header_is_refused_by_its_key() {
        for (text, key) in [
            (
                r#"otlp_endpoint = "127.0.0.1:4318""#,
                "telemetry.otlp_endpoint",
            ),
            (r#"otlp_protocol = "http/json""#, "telemetry.otlp_protocol"),
            (
                r#"otlp_headers = { "a b" = "x" }"#,
                "telemetry.otlp_headers.a b",
            ),
            (
                r#"otlp_headers = { "a" = "x\ny" }"#,
                "telemetry.otlp_headers.a",
            ),
            ("max_queue_spans = 0", "telemetry.max_queue_spans"),
            (
                "otlp_endpoint = \"https://c:4317\"\notlp_protocol = \"grpc\"",
                "telemetry.otlp_endpoint",
            ),
        ] {
            assert_eq!(parse(text).unwrap_err().path, key, "{text}");
        }
    }
}
