//! API keys and the consumers they belong to.
//!
//! The config holds only SHA-256 digests. A presented key is hashed and
//! compared in constant time against every digest (no early exit), so
//! neither the comparison nor the lookup leaks which digest came close.
//! Keys are never logged, echoed or stored; events carry `api_key_id`, a
//! short prefix of the digest.

use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tollgate_schemas::credential;

use crate::config::ConsumerConfig;

#[derive(Debug)]
pub struct Consumer {
    pub name: String,
    pub team: Option<String>,
    models: Option<Vec<glob::Pattern>>,
}

impl Consumer {
    pub fn may_use(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|globs| globs.iter().any(|g| g.matches(model)))
    }
}

/// Who made a request.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub consumer: &'a Consumer,
    /// Non-secret key id: `k_` and the first 8 hex digits of the digest.
    pub key_id: KeyId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyId([u8; 10]);

impl KeyId {
    fn of(digest: &[u8; 32]) -> Self {
        let mut id = *b"k_00000000";
        let _ = hex::encode_to_slice(&digest[..4], &mut id[2..]);
        KeyId(id)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("k_invalid")
    }
}

pub struct Keyring {
    consumers: Vec<Consumer>,
    /// (digest, index into `consumers`)
    digests: Vec<([u8; 32], usize)>,
}

impl Keyring {
    pub fn new(configs: &[ConsumerConfig]) -> Self {
        let mut consumers = Vec::new();
        let mut digests = Vec::new();
        for c in configs {
            let models = c.models.as_ref().map(|ms| {
                ms.iter()
                    .filter_map(|m| glob::Pattern::new(m).ok())
                    .collect()
            });
            for d in &c.key_hashes {
                digests.push((*d, consumers.len()));
            }
            consumers.push(Consumer {
                name: c.name.clone(),
                team: c.team.clone(),
                models,
            });
        }
        Self { consumers, digests }
    }

    /// The caller behind the request's key, if the key is known.
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<Caller<'_>> {
        let key = presented_key(headers)?;
        let digest: [u8; 32] = Sha256::digest(key).into();
        let mut found = usize::MAX;
        for (d, idx) in &self.digests {
            let hit: bool = d.ct_eq(&digest).into();
            // Branch-free select keeps the scan's timing independent of the hit.
            found = if hit { *idx } else { found };
        }
        let consumer = self.consumers.get(found)?;
        Some(Caller {
            consumer,
            key_id: KeyId::of(&digest),
        })
    }
}

/// The key from `Authorization: Bearer` or `x-api-key`, as raw bytes.
/// Whether the request presents `token` (the admin token), compared by
/// digest in constant time.
pub fn presents(headers: &HeaderMap, token: &str) -> bool {
    let Some(key) = presented_key(headers) else {
        return false;
    };
    let given: [u8; 32] = Sha256::digest(key).into();
    let want: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    given.ct_eq(&want).into()
}

fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    let authorization = headers.get(AUTHORIZATION).map(HeaderValue::as_bytes);
    // `Authorization` decides when present: no second lookup then.
    let api_key = match authorization {
        None => headers.get("x-api-key").map(HeaderValue::as_bytes),
        Some(_) => None,
    };
    credential::presented(authorization, api_key).ok()
}

/// A new random key and the config line that grants it.
pub fn new_key() -> Result<(String, String), getrandom::Error> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes)?;
    let key = format!("tg-{}", hex::encode(bytes));
    let line = format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())));
    Ok((key, line))
}

/// The `sha256:<hex>` form of an existing key.
pub fn hash_key(key: &str) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(key.trim().as_bytes()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(key: &str, models: Option<Vec<&str>>) -> Keyring {
        let line = hash_key(key);
        let mut digest = [0u8; 32];
        hex::decode_to_slice(&line[7..], &mut digest).unwrap();
        Keyring::new(&[ConsumerConfig {
            name: "app".into(),
            team: Some("t".into()),
            key_hashes: vec![digest],
            models: models.map(|m| m.into_iter().map(String::from).collect()),
        }])
    }

    fn headers(name: &str, value: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value).unwrap(),
        );
        h
    }

    #[test]
    fn keys_from_either_header() {
        let r = ring("tg-secret", None);
        assert_eq!(
            r.authenticate(&headers("authorization", b"Bearer tg-secret"))
                .unwrap()
                .consumer
                .name,
            "app"
        );
        assert!(
            r.authenticate(&headers("authorization", b"bearer  tg-secret "))
                .is_some()
        );
        assert!(
            r.authenticate(&headers("x-api-key", b"tg-secret"))
                .is_some()
        );
        let id = r
            .authenticate(&headers("x-api-key", b"tg-secret"))
            .unwrap()
            .key_id;
        assert!(id.as_str().starts_with("k_") && id.as_str().len() == 10);
        assert!(!id.as_str().contains("secret"));
    }

    #[test]
    fn hostile_keys_are_refused() {
        let r = ring("tg-secret", None);
        let long = vec![b'a'; 65_536];
        let cases: Vec<(&str, &[u8])> = vec![
            ("authorization", b"Bearer ' OR '1'='1"),
            ("authorization", b"Bearer "),
            ("authorization", b"Basic dGctc2VjcmV0"),
            ("authorization", b"tg-secret"),
            ("authorization", &long),
            ("authorization", "Bearer ключ".as_bytes()),
            ("x-api-key", b""),
        ];
        for (name, value) in cases {
            assert!(
                r.authenticate(&headers(name, value)).is_none(),
                "{name}: {:?}",
                String::from_utf8_lossy(value)
            );
        }
        assert!(r.authenticate(&HeaderMap::new()).is_none());
    }

    #[test]
    fn model_globs_limit_what_a_consumer_may_call() {
        let r = ring("k", Some(vec!["deepseek-r1", "qwq-*"]));
        let c = r
            .authenticate(&headers("x-api-key", b"k"))
            .unwrap()
            .consumer;
        assert!(c.may_use("deepseek-r1"));
        assert!(c.may_use("qwq-32b"));
        assert!(!c.may_use("gpt-4o"));
        assert!(!c.may_use("deepseek-r1x"));
    }

    #[test]
    fn new_keys_are_random_and_hash_to_their_line() {
        let (k1, l1) = new_key().unwrap();
        let (k2, _) = new_key().unwrap();
        assert_ne!(k1, k2);
        assert_eq!(hash_key(&k1), l1);
        assert_eq!(k1.len(), 3 + 48);
    }
}
