//! `[gateway]`: where the gateway listens, how large a request and a held
//! response may be, and how its ledger rows name the instance, price and
//! record the client's address.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use tollgate_schemas::config::{Invalid, Secret};
use toml::Spanned;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// Largest request body accepted, bytes.
    pub max_body_bytes: usize,
    /// Largest non-streamed upstream response the gateway will hold, bytes.
    pub max_response_bytes: usize,
    /// Name written into every event's `gateway_instance`.
    pub instance: String,
    /// A price catalog file; `None` = the catalog shipped in the binary.
    pub prices: Option<PathBuf>,
    pub client_ip: ClientIp,
    /// Where the client's address comes from for `key = "ip"` limits: the
    /// TCP peer (`None`), or this header set by a trusted proxy in front
    /// (`x-forwarded-for`: its last entry, the one that proxy appended).
    pub client_ip_header: Option<String>,
    /// Reads every rule's state on `GET /v1/limits`; `None`: the binary
    /// uses `[query] admin_token`, else only consumers see their own.
    pub admin_token: Option<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientIp {
    /// Recorded as seen.
    Plain,
    /// Recorded as a salted-free SHA-256 prefix: joinable, not readable.
    Hashed,
    /// Not recorded.
    Off,
}

/// `[gateway]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    listen: Option<Spanned<String>>,
    max_body_bytes: Option<usize>,
    max_response_bytes: Option<usize>,
    instance: Option<String>,
    prices: Option<PathBuf>,
    client_ip: Option<ClientIp>,
    client_ip_header: Option<String>,
    admin_token: Option<String>,
}

pub fn validate(g: RawGateway) -> Result<GatewayConfig, Invalid> {
    let listen = match g.listen {
        None => SocketAddr::from(([127, 0, 0, 1], 8080)),
        Some(s) => s.get_ref().parse().map_err(|e| {
            Invalid::at(
                s.span(),
                "gateway.listen",
                format!("{:?} is not an address: {e}", s.get_ref()),
            )
        })?,
    };
    Ok(GatewayConfig {
        listen,
        max_body_bytes: g.max_body_bytes.unwrap_or(4 << 20),
        max_response_bytes: g.max_response_bytes.unwrap_or(64 << 20),
        instance: g.instance.unwrap_or_else(default_instance),
        prices: g.prices,
        client_ip: g.client_ip.unwrap_or(ClientIp::Plain),
        client_ip_header: match g.client_ip_header {
            Some(h) if http::HeaderName::from_bytes(h.as_bytes()).is_err() => {
                return Err(Invalid::key(
                    "gateway.client_ip_header",
                    format!("{h:?} is not a header name"),
                ));
            }
            h => h.map(|h| h.to_ascii_lowercase()),
        },
        admin_token: g.admin_token.and_then(Secret::new),
    })
}

fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "gateway".to_string());
    format!("{host}-{}", std::process::id())
}
