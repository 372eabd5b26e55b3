//! Exact US-dollar amounts.
//!
//! Money is a decimal, never a float: sums over millions of rows must equal
//! their line items to the last micro-dollar. In JSON an amount is written as
//! a plain number with its exact decimal digits; on the way back a reader
//! gets the shortest decimal that round-trips, which is the written value
//! for every amount with at most 15 significant digits (all per-request
//! amounts, rounded to [`Usd::SCALE`] places).

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Usd(pub Decimal);

impl Usd {
    /// Decimal places kept per amount: a tenth of a nano-dollar, enough for
    /// one token at any published per-million price.
    pub const SCALE: u32 = 10;
    pub const ZERO: Usd = Usd(Decimal::ZERO);

    /// `tokens` at `per_million` dollars per 1M tokens.
    pub fn for_tokens(tokens: u64, per_million: Decimal) -> Usd {
        let mut amount = Decimal::from(tokens) * per_million;
        // Dividing by 10^6 is moving the decimal point: exact, and no
        // division on the request path. Past Decimal's 28 places, divide.
        if amount.scale() + 6 <= 28 {
            amount.set_scale(amount.scale() + 6).unwrap_or_default();
        } else {
            amount = amount / Decimal::ONE_THOUSAND / Decimal::ONE_THOUSAND;
        }
        Usd(amount.round_dp(Self::SCALE).normalize())
    }

    pub fn decimal(&self) -> Decimal {
        self.0
    }

    /// The amount as an integer count of 10^-SCALE dollars: the mantissa of
    /// the lake's `Decimal128` columns.
    pub fn to_scaled(&self) -> i128 {
        let mut d = self.0;
        d.rescale(Self::SCALE);
        d.mantissa()
    }

    /// The inverse of [`Usd::to_scaled`]; `None` when out of range.
    pub fn from_scaled(units: i128) -> Option<Usd> {
        Decimal::try_from_i128_with_scale(units, Self::SCALE)
            .ok()
            .map(|d| Usd(d.normalize()))
    }
}

impl std::ops::Add for Usd {
    type Output = Usd;
    fn add(self, rhs: Usd) -> Usd {
        Usd((self.0 + rhs.0).normalize())
    }
}

impl std::iter::Sum for Usd {
    fn sum<I: Iterator<Item = Usd>>(iter: I) -> Usd {
        iter.fold(Usd::ZERO, |a, b| a + b)
    }
}

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.normalize(), f)
    }
}

impl FromStr for Usd {
    type Err = rust_decimal::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Decimal::from_str(s).map(|d| Usd(d.normalize()))
    }
}

impl Serialize for Usd {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // A raw JSON number token keeps every digit; other formats get text.
        let text = self.0.normalize().to_string();
        match serde_json::value::RawValue::from_string(text.clone()) {
            Ok(raw) if s.is_human_readable() => raw.serialize(s),
            _ => s.serialize_str(&text),
        }
    }
}

impl<'de> Deserialize<'de> for Usd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Usd;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a dollar amount as a number or a decimal string")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Usd, E> {
                Ok(Usd(Decimal::from(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Usd, E> {
                Ok(Usd(Decimal::from(v)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Usd, E> {
                // Rust prints the shortest string that round-trips, which is
                // the decimal that was written (see the module comment).
                self.visit_str(&v.to_string())
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Usd, E> {
                Usd::from_str(v).map_err(|e| E::custom(format!("bad dollar amount {v:?}: {e}")))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd(s: &str) -> Usd {
        Usd::from_str(s).unwrap()
    }

    #[test]
    fn scaled_units_round_trip() {
        for s in [
            "0",
            "0.00029",
            "1.5",
            "123456789.0123456789",
            "0.0000000001",
        ] {
            let u = usd(s);
            assert_eq!(Usd::from_scaled(u.to_scaled()), Some(u), "{s}");
        }
        assert_eq!(usd("0.00029").to_scaled(), 2_900_000);
    }

    #[test]
    fn one_token_at_published_prices_is_exact() {
        assert_eq!(Usd::for_tokens(1, Decimal::new(14, 2)), usd("0.00000014"));
        assert_eq!(Usd::for_tokens(1000, Decimal::new(219, 2)), usd("0.00219"));
        assert_eq!(
            Usd::for_tokens(3, Decimal::new(375, 4)),
            usd("0.0000001125")
        );
    }

    #[test]
    fn json_round_trip_keeps_every_digit() {
        for s in [
            "0",
            "0.00000014",
            "123.4567890123",
            "0.0000000001",
            "99999.9999999999",
        ] {
            let v = usd(s);
            let json = serde_json::to_string(&v).unwrap();
            assert_eq!(json, s, "written as a bare number");
            let back: Usd = serde_json::from_str(&json).unwrap();
            assert_eq!(back, v, "{s}");
        }
        let from_text: Usd = serde_json::from_str("\"0.55\"").unwrap();
        assert_eq!(from_text, usd("0.55"));
    }

    #[test]
    fn sums_do_not_drift() {
        let total: Usd = (0..1_000_000).map(|_| usd("0.0000001")).sum();
        assert_eq!(total, usd("0.1"));
    }
}
