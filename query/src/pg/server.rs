//! What a client asks the server about itself, answered as PostgreSQL 16
//! would so that drivers' version checks and settings reads pass:
//! `version()` (SQLAlchemy and Grafana parse `PostgreSQL <major>.<minor>`
//! out of it) and `current_setting(name [, missing_ok])` for the settings
//! drivers and psql read. Tollgate and DataFusion are named after the
//! version, so nobody mistakes the server for PostgreSQL itself.

use std::sync::Arc;

use arrow::array::{Array, AsArray, StringBuilder};
use arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, Signature, Volatility};
use datafusion::prelude::SessionContext;

use super::functions;

/// The PostgreSQL release whose behaviour the wire follows, as
/// `server_version` and `server_version_num` report it.
pub const SERVER_VERSION: &str = "16.6";
const SERVER_VERSION_NUM: &str = "160006";

/// The start of an unknown setting's error (SQLSTATE 42704, as in
/// PostgreSQL).
pub const UNRECOGNIZED: &str = "unrecognized configuration parameter";

/// The settings `current_setting` answers; names are matched without case.
const SETTINGS: &[(&str, &str)] = &[
    ("server_version", SERVER_VERSION),
    ("server_version_num", SERVER_VERSION_NUM),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("search_path", "\"$user\", public"),
    ("timezone", "UTC"),
    ("datestyle", "ISO, MDY"),
    ("intervalstyle", "postgres"),
    ("standard_conforming_strings", "on"),
    ("integer_datetimes", "on"),
    ("max_identifier_length", "63"),
    ("transaction_isolation", "read committed"),
    ("default_transaction_isolation", "read committed"),
    ("transaction_read_only", "on"),
    ("default_transaction_read_only", "on"),
    ("is_superuser", "off"),
    ("application_name", ""),
    ("lc_collate", "C"),
    ("lc_ctype", "C"),
    ("bytea_output", "hex"),
    ("jit", "off"),
];

/// The start of the refusal of any time zone but UTC (SQLSTATE 0A000).
pub const ONLY_UTC: &str = "the ledger answers in UTC";

/// `Ok` for a spelling of UTC; otherwise the refusal, saying how to convert
/// in the query instead. Sessions are shared by a principal's connections,
/// so one connection's zone cannot be honoured.
pub fn only_utc(value: &str) -> Result<(), String> {
    let zone = value.trim().trim_matches(|c| c == '\'' || c == '"');
    let utc = [
        "utc",
        "etc/utc",
        "gmt",
        "etc/gmt",
        "z",
        "zulu",
        "universal",
        "+00:00",
        "00:00",
        "0",
        "+0",
        "local",
        "default",
    ];
    if utc.contains(&zone.to_ascii_lowercase().as_str()) {
        Ok(())
    } else {
        Err(format!(
            "{ONLY_UTC} and cannot switch a session to {zone:?}; convert in the query with AT TIME ZONE '{zone}'"
        ))
    }
}

/// `version()`: `PostgreSQL 16.6 (Tollgate x.y.z, Apache DataFusion a.b.c) on ...`.
pub fn version_text() -> String {
    format!(
        "PostgreSQL {SERVER_VERSION} (Tollgate {}, Apache DataFusion {}) on {}-linux, 64-bit",
        env!("CARGO_PKG_VERSION"),
        datafusion::DATAFUSION_VERSION,
        std::env::consts::ARCH
    )
}

/// A setting's value; `None` for one the server does not have.
pub fn setting(name: &str) -> Option<&'static str> {
    SETTINGS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
        .map(|(_, v)| *v)
}

fn scalar_text(v: &ScalarValue) -> Option<String> {
    match v {
        ScalarValue::Utf8(s) | ScalarValue::Utf8View(s) | ScalarValue::LargeUtf8(s) => s.clone(),
        _ => None,
    }
}

/// `current_setting(name [, missing_ok])`.
fn current_setting(args: ScalarFunctionArgs) -> Result<ColumnarValue> {
    let missing_ok = match args.args.get(1) {
        None => false,
        Some(ColumnarValue::Scalar(ScalarValue::Boolean(b))) => b.unwrap_or(false),
        Some(_) => {
            return Err(DataFusionError::Plan(
                "current_setting(name, missing_ok): missing_ok must be a boolean constant".into(),
            ));
        }
    };
    if args.args.is_empty() || args.args.len() > 2 {
        return Err(DataFusionError::Plan(
            "current_setting takes a setting name and, optionally, missing_ok".into(),
        ));
    }
    let lookup = |name: &str| -> Result<Option<String>> {
        match setting(name) {
            Some(v) => Ok(Some(v.to_string())),
            None if missing_ok => Ok(None),
            None => Err(DataFusionError::Execution(format!(
                "{UNRECOGNIZED} \"{name}\""
            ))),
        }
    };
    match &args.args[0] {
        ColumnarValue::Scalar(v) => {
            let value = match scalar_text(v) {
                Some(name) => lookup(&name)?,
                None => None,
            };
            Ok(ColumnarValue::Scalar(ScalarValue::Utf8(value)))
        }
        ColumnarValue::Array(names) => {
            let names = arrow::compute::cast(names, &DataType::Utf8)?;
            let names = names.as_string::<i32>();
            let mut out = StringBuilder::with_capacity(names.len(), names.len() * 8);
            for i in 0..names.len() {
                if names.is_null(i) {
                    out.append_null();
                } else {
                    out.append_option(lookup(names.value(i))?);
                }
            }
            Ok(ColumnarValue::Array(Arc::new(out.finish())))
        }
    }
}

/// Registers `version()` and `current_setting()` in `ctx` (replacing
/// DataFusion's own `version()`).
pub fn install(ctx: &SessionContext) {
    ctx.register_udf(functions::text(
        "version",
        Signature::nullary(Volatility::Stable),
        |_| {
            Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(
                version_text(),
            ))))
        },
    ));
    ctx.register_udf(functions::text(
        "current_setting",
        Signature::variadic_any(Volatility::Stable),
        current_setting,
    ));
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn version_and_settings_read_as_postgresql_16() {
        let ctx = SessionContext::new();
        install(&ctx);
        let out = ctx
            .sql("SELECT version(), current_setting('server_version_num'), current_setting('SEARCH_PATH'), current_setting('nope', true)")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let b = &out[0];
        let text = |c: usize| {
            let a = arrow::compute::cast(b.column(c), &DataType::Utf8).unwrap();
            let s = a.as_string::<i32>();
            (!s.is_null(0)).then(|| s.value(0).to_string())
        };
        assert!(text(0).unwrap().starts_with("PostgreSQL 16.6 (Tollgate "));
        assert_eq!(text(1).as_deref(), Some("160006"));
        assert_eq!(text(2).as_deref(), Some("\"$user\", public"));
        assert_eq!(text(3), None);
        let err = ctx
            .sql("SELECT current_setting('nope')")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap_err();
        assert!(err.to_string().contains(UNRECOGNIZED), "{err}");
    }
}
