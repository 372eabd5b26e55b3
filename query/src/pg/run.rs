//! Running one planned query on the wire within the engine's limits:
//! checked ([`plan`], [`read_query`]), its parameters bound, collected
//! under the limits, and encoded with its columns named and typed as
//! PostgreSQL would name and type them. Every statement that reads goes
//! through here: plain queries, cursors, `EXECUTE` and `COPY`.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, FieldRef, Schema, SchemaRef};
use datafusion::common::ParamValues;
use datafusion::datasource::MemTable;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion_postgres::arrow_pg::datatypes::PG_TYPE_KEY;
use datafusion_postgres::arrow_pg::datatypes::df::encode_dataframe;
use datafusion_postgres::pgwire::api::Type;
use datafusion_postgres::pgwire::api::portal::Format;
use datafusion_postgres::pgwire::api::results::{FieldInfo, Response};
use datafusion_postgres::pgwire::error::PgWireResult;
use datafusion_postgres::pgwire::types::format::FormatOptions;

use super::errors::pg_error;
use super::names;
use crate::QueryError;
use crate::engine::Engine;
use crate::guard::{self, Allowed};
use crate::metrics::Surface;

/// Runs a plan [`plan`] checked under the engine's limits, then hands the
/// result to the encoder from memory, its columns named as PostgreSQL
/// names them ([`names`]).
pub async fn run_bounded(
    engine: &Engine,
    ctx: &SessionContext,
    (statement, plan): (&Statement, LogicalPlan),
    params: Option<&ParamValues>,
    format: &Format,
    options: Arc<FormatOptions>,
) -> PgWireResult<Response> {
    let (schema, batches) = collect_bounded(engine, ctx, statement, plan, params)
        .await
        .map_err(pg_error)?;
    let table = MemTable::try_new(schema, vec![batches])
        .map_err(|e| pg_error(QueryError::from_datafusion(e)))?;
    let frame = ctx
        .read_table(Arc::new(table))
        .map_err(|e| pg_error(QueryError::from_datafusion(e)))?;
    let mut response = encode_dataframe(frame, format, Some(options)).await?;
    response.row_schema = names::apply(statement, response.row_schema.clone());
    Ok(Response::Query(response))
}

/// A plan's rows, its parameters bound, collected within the engine's
/// limits; columns cast to text lose the PostgreSQL type tag.
pub async fn collect_bounded(
    engine: &Engine,
    ctx: &SessionContext,
    statement: &Statement,
    plan: LogicalPlan,
    params: Option<&ParamValues>,
) -> Result<(SchemaRef, Vec<RecordBatch>), QueryError> {
    let plan = match params {
        Some(p) => plan
            .replace_params_with_values(p)
            .map_err(QueryError::from_datafusion)?,
        None => plan,
    };
    let start = std::time::Instant::now();
    let frame = ctx
        .execute_logical_plan(plan)
        .await
        .map_err(QueryError::from_datafusion)?;
    let out = engine.run_frame(frame).await?;
    engine
        .metrics()
        .answered(Surface::Pg, start.elapsed(), &out.batches);
    untag_text_casts(statement, out.schema, out.batches)
}

/// A column the query casts to text goes as text, not as the PostgreSQL
/// type (`uuid`, `json`) its field says the text is of: the engine drops a
/// cast from text to text, and the tag with it would survive.
fn untag_text_casts(
    statement: &Statement,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
) -> Result<(SchemaRef, Vec<RecordBatch>), QueryError> {
    let Some(casts) = names::text_casts(statement) else {
        return Ok((schema, batches));
    };
    let tagged = |(f, cast): (&FieldRef, &bool)| *cast && f.metadata().contains_key(PG_TYPE_KEY);
    if casts.len() != schema.fields().len() || !schema.fields().iter().zip(&casts).any(tagged) {
        return Ok((schema, batches));
    }
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .zip(&casts)
        .map(|(f, cast)| {
            let mut f = f.as_ref().clone();
            if *cast {
                let mut metadata = f.metadata().clone();
                metadata.remove(PG_TYPE_KEY);
                f = f.with_metadata(metadata);
            }
            f
        })
        .collect();
    let schema = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
    let batches = batches
        .into_iter()
        .map(|b| RecordBatch::try_new(schema.clone(), b.columns().to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| QueryError::Internal(e.to_string()))?;
    Ok((schema, batches))
}

/// [`untag_text_casts`] for a statement's described columns: a column cast
/// to text is described as `text`.
pub fn untag_text_cast_fields(statement: &Statement, fields: Vec<FieldInfo>) -> Vec<FieldInfo> {
    let Some(casts) = names::text_casts(statement) else {
        return fields;
    };
    if casts.len() != fields.len() {
        return fields;
    }
    fields
        .into_iter()
        .zip(casts)
        .map(|(f, cast)| {
            if cast && matches!(*f.datatype(), Type::UUID | Type::JSON | Type::JSONB) {
                FieldInfo::new(
                    f.name().to_string(),
                    f.table_id(),
                    f.column_id(),
                    Type::TEXT,
                    f.format(),
                )
                .with_format_options(f.format_options().clone())
            } else {
                f
            }
        })
        .collect()
}

/// The query a statement wraps, checked to be one that only reads.
pub fn read_query(statement: Statement) -> Result<Statement, QueryError> {
    match guard::check_sql(&statement)? {
        Allowed::Query => Ok(statement),
        Allowed::Explain { .. } => Err(QueryError::NotAcceptable(
            "EXPLAIN cannot be wrapped in COPY, a cursor or a prepared statement".into(),
        )),
    }
}

pub fn parse_query(sql: &str) -> Result<Statement, QueryError> {
    Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|e| QueryError::Sql(e.to_string()))?
        .pop()
        .ok_or_else(|| QueryError::Sql("empty statement".into()))
}

pub async fn plan(ctx: &SessionContext, statement: &Statement) -> Result<LogicalPlan, QueryError> {
    let plan = ctx
        .state()
        .statement_to_plan(DfStatement::Statement(Box::new(statement.clone())))
        .await
        .map_err(QueryError::from_datafusion)?;
    guard::verify(&plan)?;
    Ok(plan)
}
