//! PostgreSQL's names for result columns a query did not name. DataFusion
//! names `SELECT 1` `Int64(1)` and `SELECT count(*)` `count(*)`; PostgreSQL
//! says `?column?` and `count`, and clients that read columns by name (a
//! BI tool, `pandas.read_sql`) expect PostgreSQL's. Only the names on the
//! wire change: a column the query named, or a plain column reference,
//! keeps its name, and nothing is renamed when a `*` makes positions
//! unknowable from the statement.

use std::sync::Arc;

use datafusion::sql::sqlparser::ast::{
    DataType, Expr, ObjectNamePart, Query, SelectItem, SetExpr, Statement,
};
use datafusion_postgres::pgwire::api::results::FieldInfo;

/// The name PostgreSQL gives each result column of `statement`, `None` for
/// a column whose engine name already matches; `None` overall when the
/// statement is not a plain query or selects a `*`.
pub fn of(statement: &Statement) -> Option<Vec<Option<String>>> {
    let Statement::Query(query) = statement else {
        return None;
    };
    let items = select_items(query)?;
    items
        .iter()
        .map(|item| match item {
            SelectItem::UnnamedExpr(e) => Some(name(e)),
            SelectItem::ExprWithAlias { .. } | SelectItem::ExprWithAliases { .. } => Some(None),
            _ => None,
        })
        .collect()
}

/// The select list that names a query's columns: a set operation takes
/// its first branch's names, as in PostgreSQL.
fn select_items(query: &Query) -> Option<&[SelectItem]> {
    let mut body = query.body.as_ref();
    loop {
        match body {
            SetExpr::Select(select) => return Some(&select.projection),
            SetExpr::Query(q) => body = q.body.as_ref(),
            SetExpr::SetOperation { left, .. } => body = left.as_ref(),
            _ => return None,
        }
    }
}

/// PostgreSQL's `FigureColname`, for the expressions clients meet.
fn name(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(_) | Expr::CompoundIdentifier(_) => None,
        Expr::Nested(inner) => name(inner),
        Expr::Function(f) => f.name.0.last().map(|part| match part {
            ObjectNamePart::Identifier(i) if i.quote_style.is_some() => i.value.clone(),
            ObjectNamePart::Identifier(i) => i.value.to_lowercase(),
            other => other.to_string().to_lowercase(),
        }),
        Expr::Cast {
            expr, data_type, ..
        } => match expr.as_ref() {
            // DataFusion qualifies a cast column (`usage.status`).
            Expr::Identifier(i) => Some(i.value.clone()),
            Expr::CompoundIdentifier(parts) => parts.last().map(|i| i.value.clone()),
            Expr::Function(_) | Expr::Nested(_) | Expr::Cast { .. } => name(expr),
            _ => Some(type_name(data_type)),
        },
        Expr::Case { .. } => Some("case".into()),
        Expr::Exists { .. } => Some("exists".into()),
        Expr::Array(_) => Some("array".into()),
        Expr::Extract { .. } => Some("extract".into()),
        _ => Some("?column?".into()),
    }
}

/// A cast's target as PostgreSQL names its type (`int4`, `float8`, ...).
fn type_name(t: &DataType) -> String {
    match t {
        DataType::Int(_) | DataType::Integer(_) | DataType::Int4(_) => "int4".into(),
        DataType::BigInt(_) | DataType::Int8(_) => "int8".into(),
        DataType::SmallInt(_) | DataType::Int2(_) => "int2".into(),
        DataType::Real | DataType::Float4 => "float4".into(),
        DataType::Double(_) | DataType::DoublePrecision | DataType::Float8 => "float8".into(),
        DataType::Boolean | DataType::Bool => "bool".into(),
        DataType::Numeric(_) | DataType::Decimal(_) => "numeric".into(),
        DataType::Varchar(_) | DataType::CharacterVarying(_) => "varchar".into(),
        DataType::Char(_) | DataType::Character(_) => "bpchar".into(),
        other => other.to_string().to_lowercase(),
    }
}

/// Which result columns of `statement` are cast to text (`x::text`,
/// `CAST(x AS VARCHAR)`): such a column is text, whatever PostgreSQL type
/// (`uuid`, `json`) `x` holds the text of. `None` when unknowable, as for
/// [`of`].
pub fn text_casts(statement: &Statement) -> Option<Vec<bool>> {
    let Statement::Query(query) = statement else {
        return None;
    };
    select_items(query)?
        .iter()
        .map(|item| match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                Some(is_text_cast(e))
            }
            SelectItem::ExprWithAliases { expr, .. } => Some(is_text_cast(expr)),
            _ => None,
        })
        .collect()
}

fn is_text_cast(e: &Expr) -> bool {
    match e {
        Expr::Nested(inner) => is_text_cast(inner),
        Expr::Cast { data_type, .. } => matches!(
            data_type,
            DataType::Text
                | DataType::Varchar(_)
                | DataType::CharacterVarying(_)
                | DataType::String(_)
                | DataType::Char(_)
                | DataType::Character(_)
        ),
        _ => false,
    }
}

/// `fields` with the names PostgreSQL would give; unchanged when the
/// statement gives none or the counts differ.
pub fn apply(statement: &Statement, fields: Arc<Vec<FieldInfo>>) -> Arc<Vec<FieldInfo>> {
    let Some(names) = of(statement) else {
        return fields;
    };
    if names.len() != fields.len() || names.iter().all(Option::is_none) {
        return fields;
    }
    Arc::new(
        fields
            .iter()
            .zip(names)
            .map(|(f, name)| match name {
                None => f.clone(),
                Some(name) => FieldInfo::new(
                    name,
                    f.table_id(),
                    f.column_id(),
                    f.datatype().clone(),
                    f.format(),
                )
                .with_format_options(f.format_options().clone())
                .with_type_size(f.type_size())
                .with_type_modifier(f.type_modifier()),
            })
            .collect(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    fn names(sql: &str) -> Option<Vec<Option<String>>> {
        let statement = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .unwrap()
            .remove(0);
        of(&statement)
    }

    #[test]
    fn unnamed_columns_are_named_as_postgresql_names_them() {
        let s = |v: &str| Some(v.to_string());
        let cases: &[(&str, Option<Vec<Option<String>>>)] = &[
            ("SELECT 1", Some(vec![s("?column?")])),
            (
                "SELECT count(*), SUM(x), \"Quoted\"(y) FROM t",
                Some(vec![s("count"), s("sum"), s("Quoted")]),
            ),
            (
                "SELECT x, t.y, x AS z, x + 1 FROM t",
                Some(vec![None, None, None, s("?column?")]),
            ),
            (
                "SELECT x::int, 1::int, 2::bigint, count(*)::text FROM t",
                Some(vec![s("x"), s("int4"), s("int8"), s("count")]),
            ),
            (
                "SELECT CASE WHEN x THEN 1 END, (count(*)) FROM t",
                Some(vec![s("case"), s("count")]),
            ),
            ("SELECT 1 UNION SELECT 2", Some(vec![s("?column?")])),
            ("SELECT * FROM t", None),
            ("SHOW ALL", None),
        ];
        for (sql, want) in cases {
            assert_eq!(&names(sql), want, "{sql}");
        }
    }

    #[test]
    fn casts_to_text_are_found_whatever_their_spelling() {
        let casts = |sql: &str| {
            text_casts(
                &Parser::parse_sql(&PostgreSqlDialect {}, sql)
                    .unwrap()
                    .remove(0),
            )
        };
        assert_eq!(
            casts(
                "SELECT id::text, CAST(id AS VARCHAR) AS v, (id::varchar(40)), id, id::int FROM t"
            ),
            Some(vec![true, true, true, false, false])
        );
        assert_eq!(casts("SELECT * FROM t"), None);
    }
}
