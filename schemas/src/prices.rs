//! The price catalog: dollars per 1M tokens per model, with validity periods.
//!
//! The shipped catalog is `schemas/prices.toml`, compiled in; a deployment
//! may point at its own file with the same format.

use std::collections::HashMap;
use std::path::Path;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;

use crate::money::Usd;
use crate::tokens::Tokens;

/// The catalog shipped with this build.
pub const SHIPPED: &str = include_str!("../prices.toml");

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read price catalog {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("price catalog {origin}: {source}")]
    Parse {
        origin: String,
        source: Box<toml::de::Error>,
    },
    #[error("price catalog {origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// Prices of one model from `effective_from` on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub model: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// $ per 1M uncached input tokens.
    pub input: Usd,
    /// $ per 1M cached input tokens.
    pub cached_input: Usd,
    /// $ per 1M output tokens (reasoning included).
    pub output: Usd,
    pub effective_from: NaiveDate,
    pub source: String,
}

impl Price {
    /// The ledger's one cost formula.
    pub fn cost(&self, t: &Tokens) -> Usd {
        Usd::for_tokens(t.uncached_input(), self.input.decimal())
            + Usd::for_tokens(t.cached_input, self.cached_input.decimal())
            + Usd::for_tokens(t.output, self.output.decimal())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    version: String,
    models: Vec<Price>,
}

#[derive(Debug, Clone)]
pub struct PriceCatalog {
    version: String,
    /// Lower-cased model name or alias -> its entries, oldest first.
    by_name: HashMap<String, Vec<Price>>,
}

impl PriceCatalog {
    pub fn shipped() -> Result<Self, CatalogError> {
        Self::parse(SHIPPED, "schemas/prices.toml")
    }

    pub fn load(path: &Path) -> Result<Self, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, CatalogError> {
        let file: CatalogFile = toml::from_str(text).map_err(|e| CatalogError::Parse {
            origin: origin.to_string(),
            source: Box::new(e),
        })?;
        let mut by_name: HashMap<String, Vec<Price>> = HashMap::new();
        for price in file.models {
            let names = std::iter::once(&price.model).chain(&price.aliases);
            for name in names {
                let entries = by_name.entry(name.to_ascii_lowercase()).or_default();
                if entries
                    .iter()
                    .any(|p| p.effective_from == price.effective_from)
                {
                    return Err(CatalogError::Invalid {
                        origin: origin.to_string(),
                        message: format!(
                            "model {name:?} has two entries effective from {}",
                            price.effective_from
                        ),
                    });
                }
                entries.push(price.clone());
            }
        }
        for entries in by_name.values_mut() {
            entries.sort_by_key(|p| p.effective_from);
        }
        Ok(Self {
            version: file.version,
            by_name,
        })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// Every entry once, by model then date.
    pub fn entries(&self) -> Vec<&Price> {
        let mut all: Vec<&Price> = self.by_name.values().flatten().collect();
        all.sort_by(|a, b| (&a.model, a.effective_from).cmp(&(&b.model, b.effective_from)));
        all.dedup_by(|a, b| a.model == b.model && a.effective_from == b.effective_from);
        all
    }

    /// The price of `model` in force at `at`; `None` for an unknown model or
    /// a time before its first entry.
    pub fn price(&self, model: &str, at: DateTime<Utc>) -> Option<&Price> {
        let entries = self.by_name.get(&model.to_ascii_lowercase()).or_else(|| {
            // "deepseek/deepseek-r1" style names: try the part after the provider.
            let (_, bare) = model.rsplit_once('/')?;
            self.by_name.get(&bare.to_ascii_lowercase())
        })?;
        let day = at.date_naive();
        entries.iter().rev().find(|p| p.effective_from <= day)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn shipped_catalog_has_the_required_models() {
        let c = PriceCatalog::shipped().unwrap();
        let now = at("2025-11-26T00:00:00Z");
        for m in [
            "deepseek-r1",
            "deepseek-reasoner",
            "deepseek-v3",
            "deepseek-chat",
            "qwq-32b",
            "qwen-max",
            "qwen-plus",
            "qwen-turbo",
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "o3-mini",
            "claude-sonnet-4",
        ] {
            assert!(c.price(m, now).is_some(), "{m} missing");
        }
        let r1 = c.price("DeepSeek-R1", now).unwrap();
        assert_eq!(r1.input, Usd::from_str("0.55").unwrap());
        assert_eq!(r1.cached_input, Usd::from_str("0.14").unwrap());
        assert_eq!(r1.output, Usd::from_str("2.19").unwrap());
        assert!(c.price("deepseek/deepseek-r1", now).is_some());
        assert!(c.price("no-such-model", now).is_none());
    }

    #[test]
    fn cost_follows_the_one_formula() {
        let c = PriceCatalog::shipped().unwrap();
        let r1 = c.price("deepseek-r1", at("2025-11-26T00:00:00Z")).unwrap();
        // 1000 input of which 600 cached, 500 output of which 400 reasoning.
        let cost = r1.cost(&Tokens::new(1000, 600, 500, 400));
        // 400 x 0.55 + 600 x 0.14 + 500 x 2.19, per 1M.
        assert_eq!(cost, Usd::from_str("0.001399").unwrap());
    }

    #[test]
    fn the_entry_in_force_is_picked_by_date() {
        let text = r#"
            version = "v2"
            [[models]]
            model = "m"
            input = 1.0
            cached_input = 0.5
            output = 2.0
            effective_from = "2025-01-01"
            source = "old"
            [[models]]
            model = "m"
            input = 0.5
            cached_input = 0.25
            output = 1.0
            effective_from = "2025-06-01"
            source = "new"
        "#;
        let c = PriceCatalog::parse(text, "test").unwrap();
        assert_eq!(
            c.price("m", at("2025-03-01T00:00:00Z")).unwrap().source,
            "old"
        );
        assert_eq!(
            c.price("m", at("2025-06-01T00:00:00Z")).unwrap().source,
            "new"
        );
        assert!(c.price("m", at("2024-12-31T23:59:59Z")).is_none());
        assert_eq!(c.version(), "v2");
    }

    #[test]
    fn duplicate_dates_and_unknown_fields_are_refused() {
        let dup = r#"
            version = "x"
            [[models]]
            model = "m"
            input = 1.0
            cached_input = 1.0
            output = 1.0
            effective_from = "2025-01-01"
            source = "a"
            [[models]]
            model = "m"
            input = 2.0
            cached_input = 2.0
            output = 2.0
            effective_from = "2025-01-01"
            source = "b"
        "#;
        assert!(PriceCatalog::parse(dup, "t").is_err());
        let unknown = "version = \"x\"\nfoo = 1\nmodels = []\n";
        assert!(PriceCatalog::parse(unknown, "t").is_err());
    }
}
