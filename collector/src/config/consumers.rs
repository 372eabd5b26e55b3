//! `[[consumers]]`: who may call the gateway, by the SHA-256 of each of
//! their keys (never the key itself), and which models they may ask for.

use serde::Deserialize;
use tollgate_schemas::config::Invalid;
use toml::Spanned;

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub name: String,
    pub team: Option<String>,
    /// SHA-256 digests of the consumer's keys.
    pub key_hashes: Vec<[u8; 32]>,
    /// Model globs the consumer may call; `None` = all.
    pub models: Option<Vec<String>>,
}

/// One `[[consumers]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsumer {
    name: String,
    team: Option<String>,
    api_keys: Vec<Spanned<String>>,
    models: Option<Vec<Spanned<String>>>,
}

/// Names and keys are unique across consumers.
pub fn validate(raw: &[Spanned<RawConsumer>]) -> Result<Vec<ConsumerConfig>, Invalid> {
    let mut consumers: Vec<ConsumerConfig> = Vec::new();
    for (i, spanned) in raw.iter().enumerate() {
        let span = spanned.span();
        let c = spanned.get_ref();
        let err =
            |field: &str, m: String| Invalid::at(span.clone(), format!("consumers[{i}]{field}"), m);
        if c.name.is_empty() {
            return Err(err(".name", "must not be empty".into()));
        }
        if consumers.iter().any(|o| o.name == c.name) {
            return Err(err(".name", format!("{:?} is defined twice", c.name)));
        }
        let mut key_hashes = Vec::new();
        for (j, k) in c.api_keys.iter().enumerate() {
            let key_err =
                |m: String| Invalid::at(k.span(), format!("consumers[{i}].api_keys[{j}]"), m);
            let hash = parse_key_hash(k.get_ref()).map_err(key_err)?;
            let taken = consumers.iter().any(|o| o.key_hashes.contains(&hash))
                || key_hashes.contains(&hash);
            if taken {
                return Err(key_err("this key is already assigned".into()));
            }
            key_hashes.push(hash);
        }
        if let Some(models) = &c.models {
            for (j, m) in models.iter().enumerate() {
                glob::Pattern::new(m.get_ref()).map_err(|e| {
                    Invalid::at(
                        m.span(),
                        format!("consumers[{i}].models[{j}]"),
                        format!("bad glob {:?}: {e}", m.get_ref()),
                    )
                })?;
            }
        }
        consumers.push(ConsumerConfig {
            name: c.name.clone(),
            team: c.team.clone(),
            key_hashes,
            models: c
                .models
                .as_ref()
                .map(|ms| ms.iter().map(|m| m.get_ref().clone()).collect()),
        });
    }
    Ok(consumers)
}

/// `sha256:<64 hex>` -> digest. The message never repeats the value: a
/// plaintext key pasted here by mistake must not reach a log.
fn parse_key_hash(s: &str) -> Result<[u8; 32], String> {
    let hex_part = s
        .strip_prefix("sha256:")
        .ok_or("must be \"sha256:<64 hex digits>\" (run `tollgate keys new`); a plaintext key is never accepted")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out)
        .map_err(|_| "must be \"sha256:<64 hex digits>\"".to_string())?;
    Ok(out)
}
