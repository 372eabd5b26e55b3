//! The ledger's columns as PostgreSQL clients decode them. The lake keeps
//! `event_id` as 16 bytes and `tags`/`attempts` as a map and a list of
//! structs; the wire encoder has no PostgreSQL type for those, and a
//! client that cannot decode one column cannot run `SELECT *`. A session
//! on the PostgreSQL surface therefore sees `usage` as a view whose
//! `event_id` is its canonical UUID text and whose nested columns are JSON
//! text, so what `\d usage` and `information_schema` report is what comes
//! over the wire. The typed table stays behind it for the documented views,
//! and the HTTP surface keeps the typed columns.

use std::fmt::Write as _;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, StringBuilder};
use arrow::datatypes::{DataType, Field, FieldRef};
use arrow::json::writer::{EncoderOptions, make_encoder};
use datafusion::datasource::ViewTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{ColumnarValue, Expr, ScalarUDF, Signature, Volatility, ident};
use datafusion::prelude::SessionContext;

use super::functions;
use crate::tables::Ledger;

/// `to_json(value)`: any value as JSON text (PostgreSQL's `to_json`, with
/// text for its `json` result): maps as objects, lists as arrays, structs as
/// objects with explicit nulls.
pub fn to_json() -> ScalarUDF {
    functions::typed_text(
        "to_json",
        Signature::any(1, Volatility::Immutable),
        Some("json"),
        |args| {
            let [value] = args.args.as_slice() else {
                return Err(DataFusionError::Plan("to_json takes one argument".into()));
            };
            let array = value.to_array(args.number_rows)?;
            Ok(ColumnarValue::Array(json_text(&array)?))
        },
    )
}

/// One JSON text per row; SQL NULL stays NULL.
fn json_text(array: &ArrayRef) -> Result<ArrayRef> {
    let field: FieldRef = Arc::new(Field::new("v", array.data_type().clone(), true));
    let options = EncoderOptions::default().with_explicit_nulls(true);
    let mut encoder = make_encoder(&field, array.as_ref(), &options)?;
    let mut out = StringBuilder::with_capacity(array.len(), array.len() * 32);
    let mut buf = Vec::with_capacity(256);
    for row in 0..array.len() {
        if array.is_null(row) {
            out.append_null();
            continue;
        }
        buf.clear();
        encoder.encode(row, &mut buf);
        out.append_value(String::from_utf8_lossy(&buf));
    }
    Ok(Arc::new(out.finish()))
}

/// `uuid_text(bytes)`: 16 bytes as a UUID's canonical text
/// (`8-4-4-4-12` lowercase hex, RFC 9562 §4); any other length is NULL.
pub fn uuid_text() -> ScalarUDF {
    functions::typed_text(
        "uuid_text",
        Signature::any(1, Volatility::Immutable),
        Some("uuid"),
        |args| {
            let [value] = args.args.as_slice() else {
                return Err(DataFusionError::Plan("uuid_text takes one argument".into()));
            };
            let array = value.to_array(args.number_rows)?;
            let bytes = |row: usize| -> Option<&[u8]> {
                if array.is_null(row) {
                    return None;
                }
                match array.data_type() {
                    DataType::FixedSizeBinary(_) => Some(array.as_fixed_size_binary().value(row)),
                    DataType::Binary => Some(array.as_binary::<i32>().value(row)),
                    DataType::LargeBinary => Some(array.as_binary::<i64>().value(row)),
                    DataType::BinaryView => Some(array.as_binary_view().value(row)),
                    _ => None,
                }
            };
            let mut out = StringBuilder::with_capacity(array.len(), array.len() * 36);
            for row in 0..array.len() {
                match bytes(row) {
                    Some(b) if b.len() == 16 => out.append_value(uuid(b)),
                    _ => out.append_null(),
                }
            }
            Ok(ColumnarValue::Array(Arc::new(out.finish())))
        },
    )
}

fn uuid(b: &[u8]) -> String {
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        let _ = write!(s, "{byte:02x}");
    }
    s
}

/// Registers `to_json` and `uuid_text` in `ctx`.
pub fn install(ctx: &SessionContext) {
    ctx.register_udf(to_json());
    ctx.register_udf(uuid_text());
}

/// Replaces `table` in `ctx` by a view of it with every column a
/// PostgreSQL client can decode: 16-byte ids as UUID text, maps, lists and
/// structs as JSON text; other columns as they are. Views already created
/// over the table keep reading the typed one.
pub async fn wire_view(ctx: &SessionContext, table: &str) -> Result<()> {
    let typed = ctx.table(table).await?;
    let (to_json, uuid_text) = (to_json(), uuid_text());
    let columns: Vec<Expr> = typed
        .schema()
        .fields()
        .iter()
        .map(|f| {
            let name = f.name();
            match f.data_type() {
                DataType::FixedSizeBinary(16) => uuid_text.call(vec![ident(name)]).alias(name),
                DataType::Map(..)
                | DataType::List(_)
                | DataType::LargeList(_)
                | DataType::ListView(_)
                | DataType::FixedSizeList(..)
                | DataType::Struct(_) => to_json.call(vec![ident(name)]).alias(name),
                _ => ident(name),
            }
        })
        .collect();
    let plan = typed.select(columns)?.into_unoptimized_plan();
    ctx.deregister_table(table)?;
    ctx.register_table(table, Arc::new(Ledger(ViewTable::new(plan, None))))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use arrow::array::{FixedSizeBinaryArray, Int64Array, RecordBatch};
    use datafusion::datasource::MemTable;

    #[tokio::test]
    async fn ids_become_uuid_text_and_nested_columns_json_text() {
        let ctx = SessionContext::new();
        install(&ctx);
        let batch = RecordBatch::try_from_iter(vec![
            (
                "event_id",
                Arc::new(
                    FixedSizeBinaryArray::try_from_sparse_iter_with_size(
                        vec![Some((0u8..16).collect::<Vec<_>>()), None].into_iter(),
                        16,
                    )
                    .unwrap(),
                ) as ArrayRef,
            ),
            ("n", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
        ])
        .unwrap();
        let table = MemTable::try_new(batch.schema(), vec![vec![batch]]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        wire_view(&ctx, "t").await.unwrap();
        let out = ctx
            .sql("SELECT event_id, n, to_json(make_array(n, 2)) AS a, to_json(named_struct('k', n, 'z', NULL)) AS s FROM t ORDER BY n")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let b = &out[0];
        let ids = b.column(0).as_string::<i32>();
        assert_eq!(ids.value(0), "00010203-0405-0607-0809-0a0b0c0d0e0f");
        assert!(ids.is_null(1));
        assert_eq!(b.column(2).as_string::<i32>().value(0), "[1,2]");
        assert_eq!(
            b.column(3).as_string::<i32>().value(1),
            r#"{"k":2,"z":null}"#
        );
        assert_eq!(b.schema().field(0).data_type(), &DataType::Utf8);
    }
}
