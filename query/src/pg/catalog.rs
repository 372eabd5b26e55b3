//! The `pg_catalog` functions clients call that datafusion-pg-catalog does
//! not have, answered for what this server is: a read-only ledger with no
//! sequences, defaults, comments, functions of its own or per-object
//! storage. `to_regtype` resolves PostgreSQL's built-in types (SQLAlchemy's
//! first connect looks up `hstore` with it), `set_config` answers as
//! PostgreSQL does while the server's settings stay its own, the
//! `pg_*_is_visible` family says every object is visible (one schema
//! search path), the description and definition lookups psql's `\d+`,
//! `\df` and `\dT` make find nothing, and `pg_size_pretty` formats as
//! PostgreSQL 16 does (`src/backend/utils/adt/dbsize.c`).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, AsArray, Int32Builder, StringBuilder};
use arrow::datatypes::{DataType, Int64Type};
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TypeSignature,
    Volatility,
};
use datafusion::prelude::SessionContext;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::{
    PgCatalogContextProvider, Role,
};
use datafusion_postgres::pgwire::api::Type;

use super::functions;

/// Registers this module's functions in `ctx`.
pub fn install(ctx: &SessionContext) {
    ctx.register_udf(to_regtype());
    ctx.register_udf(set_config());
    ctx.register_udf(pg_size_pretty());
    for name in [
        "pg_function_is_visible",
        "pg_type_is_visible",
        "pg_collation_is_visible",
        "pg_operator_is_visible",
        "pg_opclass_is_visible",
        "pg_opfamily_is_visible",
        "pg_conversion_is_visible",
        "pg_statistics_obj_is_visible",
        "pg_ts_config_is_visible",
        "pg_ts_dict_is_visible",
        "pg_ts_parser_is_visible",
        "pg_ts_template_is_visible",
    ] {
        ctx.register_udf(constant(name, 1..=1, ScalarValue::Boolean(Some(true))));
    }
    let none = ScalarValue::Utf8(None);
    for (name, arity) in [
        ("obj_description", 1..=2),
        ("col_description", 2..=2),
        ("shobj_description", 2..=2),
        ("pg_get_ruledef", 1..=2),
        ("pg_get_triggerdef", 1..=2),
        ("pg_get_indexdef", 1..=3),
        ("pg_get_functiondef", 1..=1),
        ("pg_get_function_result", 1..=1),
        ("pg_get_function_arguments", 1..=1),
        ("pg_get_function_identity_arguments", 1..=1),
        ("pg_get_serial_sequence", 2..=2),
    ] {
        ctx.register_udf(constant(name, arity, none.clone()));
    }
    ctx.register_udf(constant(
        "pg_tablespace_location",
        1..=1,
        ScalarValue::Utf8(Some(String::new())),
    ));
    for name in ["pg_table_size", "pg_indexes_size", "pg_database_size"] {
        ctx.register_udf(constant(name, 1..=1, ScalarValue::Int64(None)));
    }
}

/// The roles `pg_roles` lists (psql's `\du`): the principals that can log
/// in. An administrator's session lists `admin` and every consumer; a
/// consumer's lists only itself, as it sees only its own rows.
#[derive(Debug, Clone)]
pub struct Roles(pub Arc<Vec<String>>);

#[async_trait::async_trait]
impl PgCatalogContextProvider for Roles {
    async fn roles(&self) -> Vec<String> {
        self.0.as_ref().clone()
    }

    async fn role(&self, name: &str) -> Option<Role> {
        self.0.iter().any(|n| n == name).then(|| Role {
            name: name.to_string(),
            is_superuser: false,
            can_login: true,
            can_create_db: false,
            can_create_role: false,
            can_create_user: false,
            can_replication: false,
            grants: vec![],
            inherited_roles: vec![],
        })
    }
}

/// A function whose answer does not depend on its arguments.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Constant {
    name: &'static str,
    signature: Signature,
    value: ScalarValue,
}

fn constant(
    name: &'static str,
    arity: std::ops::RangeInclusive<usize>,
    value: ScalarValue,
) -> ScalarUDF {
    let signature = Signature::one_of(arity.map(TypeSignature::Any).collect(), Volatility::Stable);
    ScalarUDF::new_from_impl(Constant {
        name,
        signature,
        value,
    })
}

impl ScalarUDFImpl for Constant {
    fn name(&self) -> &str {
        self.name
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(self.value.data_type())
    }
    fn invoke_with_args(&self, _: ScalarFunctionArgs) -> Result<ColumnarValue> {
        Ok(ColumnarValue::Scalar(self.value.clone()))
    }
}

/// Built-in type names (`int4`, `_text`) and the SQL spellings clients
/// pass (`integer`, `character varying`), to their OIDs.
fn type_oids() -> &'static HashMap<String, u32> {
    static OIDS: OnceLock<HashMap<String, u32>> = OnceLock::new();
    OIDS.get_or_init(|| {
        let mut map: HashMap<String, u32> = (0..10_000)
            .filter_map(Type::from_oid)
            .map(|t| (t.name().to_string(), t.oid()))
            .collect();
        for (alias, name) in [
            ("integer", "int4"),
            ("int", "int4"),
            ("smallint", "int2"),
            ("bigint", "int8"),
            ("real", "float4"),
            ("double precision", "float8"),
            ("boolean", "bool"),
            ("character varying", "varchar"),
            ("character", "bpchar"),
            ("decimal", "numeric"),
            ("timestamp without time zone", "timestamp"),
            ("timestamp with time zone", "timestamptz"),
            ("time without time zone", "time"),
            ("time with time zone", "timetz"),
        ] {
            if let Some(oid) = map.get(name).copied() {
                map.insert(alias.to_string(), oid);
            }
        }
        map
    })
}

/// `to_regtype(name)`: a type's OID, NULL for a type the server does not
/// have (as PostgreSQL's, which never raises for an unknown name).
fn to_regtype() -> ScalarUDF {
    datafusion::logical_expr::create_udf(
        "to_regtype",
        vec![DataType::Utf8],
        DataType::Int32,
        Volatility::Stable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let [names] = arrays.as_slice() else {
                return Err(DataFusionError::Plan(
                    "to_regtype takes one argument".into(),
                ));
            };
            let names = names.as_string::<i32>();
            let mut out = Int32Builder::with_capacity(names.len());
            for name in names.iter() {
                let oid = name.and_then(|n| {
                    let n = n.trim().to_ascii_lowercase();
                    let n = n.strip_prefix("pg_catalog.").unwrap_or(&n);
                    type_oids().get(n.trim_matches('"')).copied()
                });
                out.append_option(oid.map(|o| o as i32));
            }
            Ok(ColumnarValue::Array(Arc::new(out.finish())))
        }),
    )
}

/// `set_config(name, value, is_local)`: returns `value`, as PostgreSQL does.
/// The session is the server's (UTC, read-only), so nothing else changes;
/// drivers call it for settings that do not matter here (`jit`,
/// `application_name`).
fn set_config() -> ScalarUDF {
    functions::text(
        "set_config",
        Signature::any(3, Volatility::Volatile),
        |args| {
            let [name, value, _] = args.args.as_slice() else {
                return Err(DataFusionError::Plan(
                    "set_config takes three arguments".into(),
                ));
            };
            let value = value.to_array(args.number_rows)?;
            let value = arrow::compute::cast(&value, &DataType::Utf8)?;
            // The time zone is refused as by SET TIME ZONE, not ignored.
            let name = arrow::compute::cast(&name.to_array(args.number_rows)?, &DataType::Utf8)?;
            for (n, v) in name
                .as_string::<i32>()
                .iter()
                .zip(value.as_string::<i32>().iter())
            {
                if let (Some(n), Some(v)) = (n, v)
                    && n.eq_ignore_ascii_case("timezone")
                {
                    super::server::only_utc(v).map_err(DataFusionError::Execution)?;
                }
            }
            Ok(ColumnarValue::Array(value))
        },
    )
}

/// `pg_size_pretty(bytes)`: bytes, kB, MB, GB, TB or PB, rounded half away
/// from zero, as PostgreSQL 16 formats them.
fn pg_size_pretty() -> ScalarUDF {
    functions::text(
        "pg_size_pretty",
        Signature::exact(vec![DataType::Int64], Volatility::Immutable),
        |args| {
            let [value] = args.args.as_slice() else {
                return Err(DataFusionError::Plan(
                    "pg_size_pretty takes one argument".into(),
                ));
            };
            let sizes = value.to_array(args.number_rows)?;
            let sizes = sizes.as_primitive::<Int64Type>();
            let mut out = StringBuilder::with_capacity(sizes.len(), sizes.len() * 8);
            for size in sizes.iter() {
                out.append_option(size.map(size_pretty));
            }
            Ok(ColumnarValue::Array(Arc::new(out.finish())))
        },
    )
}

fn size_pretty(mut size: i64) -> String {
    // (name, limit, rounded, bits of a unit): dbsize.c's size_pretty_units.
    const UNITS: [(&str, i64, bool, u32); 6] = [
        ("bytes", 10 * 1024, false, 0),
        ("kB", 20 * 1024 - 1, true, 10),
        ("MB", 20 * 1024 - 1, true, 20),
        ("GB", 20 * 1024 - 1, true, 30),
        ("TB", 20 * 1024 - 1, true, 40),
        ("PB", 20 * 1024 - 1, true, 50),
    ];
    let half_rounded = |x: i64| (x + if x < 0 { -1 } else { 1 }) / 2;
    for (i, (name, limit, round, bits)) in UNITS.iter().enumerate() {
        let Some(next) = UNITS.get(i + 1) else {
            return format!("{} {name}", if *round { half_rounded(size) } else { size });
        };
        if size.unsigned_abs() < *limit as u64 {
            return format!("{} {name}", if *round { half_rounded(size) } else { size });
        }
        let shift = next.3 - bits - u32::from(next.2) + u32::from(*round);
        size /= 1i64 << shift;
    }
    format!("{size} PB")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_pretty_as_postgresql_prints_them() {
        for (bytes, want) in [
            (0, "0 bytes"),
            (10239, "10239 bytes"),
            (10240, "10 kB"),
            (1_000_000, "977 kB"),
            (20_971_520, "20 MB"),
            (1_073_741_824, "1024 MB"),
            (-10240, "-10 kB"),
            (i64::MAX, "8192 PB"),
        ] {
            assert_eq!(size_pretty(bytes), want, "{bytes}");
        }
    }

    #[tokio::test]
    async fn catalog_lookups_answer_for_a_read_only_ledger() {
        let ctx = SessionContext::new();
        install(&ctx);
        let out = ctx
            .sql("SELECT to_regtype('integer') AS a, to_regtype('hstore') AS b, to_regtype('pg_catalog.uuid') AS c, set_config('jit', 'off', false) AS d, pg_function_is_visible(1) AS e, obj_description(1, 'pg_class') AS f")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let b = &out[0];
        assert_eq!(
            b.column(0)
                .as_primitive::<arrow::datatypes::Int32Type>()
                .value(0),
            23
        );
        assert!(b.column(1).is_null(0));
        assert_eq!(
            b.column(2)
                .as_primitive::<arrow::datatypes::Int32Type>()
                .value(0),
            2950
        );
        assert_eq!(b.column(3).as_string::<i32>().value(0), "off");
        assert!(b.column(4).as_boolean().value(0));
        assert!(b.column(5).is_null(0));
    }
}
