//! The first hook of every session's service: each statement is run within
//! the engine's limits, acknowledged without effect, passed on to the
//! datafusion-postgres hooks (client settings, transactions), or refused.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, FieldRef, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::common::ParamValues;
use datafusion::datasource::MemTable;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{Set, Statement};
use datafusion_postgres::arrow_pg::datatypes::PG_TYPE_KEY;
use datafusion_postgres::arrow_pg::datatypes::df::encode_dataframe;
use datafusion_postgres::hooks::{HookClient, QueryHook};
use datafusion_postgres::pgwire::api::ClientInfo;
use datafusion_postgres::pgwire::api::portal::Format;
use datafusion_postgres::pgwire::api::Type;
use datafusion_postgres::pgwire::api::results::{FieldInfo, Response, Tag};
use datafusion_postgres::pgwire::error::PgWireResult;
use datafusion_postgres::pgwire::types::format::FormatOptions;

use super::errors::pg_error;
use super::{names, server, statements};
use crate::engine::Engine;
use crate::guard::{self, Allowed};
use crate::{Principal, QueryError};

/// Session settings drivers send at connect time; anything else is ignored
/// (as PostgreSQL's unknown `SET`s would be), `datafusion.*` refused.
pub const CLIENT_SETTINGS: &[&str] = &[
    "statement_timeout",
    "datestyle",
    "bytea_output",
    "intervalstyle",
    "application_name",
    "extra_float_digits",
    "search_path",
];

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
    let frame = ctx
        .execute_logical_plan(plan)
        .await
        .map_err(QueryError::from_datafusion)?;
    let out = engine.run_frame(frame).await?;
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

/// First in every service's hooks: queries run bounded, client settings
/// pass to the next hooks, everything else is refused.
pub struct Bounded {
    pub engine: Arc<Engine>,
    pub who: Principal,
}

enum Verdict {
    Run,
    /// For the next hook (SET of a client setting, SHOW, transactions).
    Pass,
    /// Answered without effect.
    Ignore,
    /// Answered with this command tag, without effect.
    Acknowledge(&'static str),
    /// `SHOW` of a server setting, answered from [`server::setting`].
    Show(String),
    /// A read-only statement other than a query ([`statements`]).
    Statement,
    Refuse(QueryError),
}

fn verdict(statement: &Statement, who: &Principal) -> Verdict {
    match statement {
        Statement::Query(_) | Statement::Explain { .. } => match guard::check_sql(statement) {
            Ok(Allowed::Explain { analyze: true }) if *who != Principal::Admin => Verdict::Refuse(
                QueryError::Forbidden(crate::engine::ANALYZE_IS_ADMIN.into()),
            ),
            Ok(_) => Verdict::Run,
            Err(e) => Verdict::Refuse(e),
        },
        Statement::Set(Set::SingleAssignment {
            variable, values, ..
        }) => {
            let var = variable.to_string().to_ascii_lowercase();
            if var == "timezone" {
                let value = values.first().map(ToString::to_string).unwrap_or_default();
                return time_zone(&value);
            }
            if CLIENT_SETTINGS.contains(&var.as_str()) {
                Verdict::Pass
            } else if var.starts_with("datafusion.") {
                Verdict::Refuse(QueryError::ReadOnly(format!(
                    "SET {var} is refused: engine settings are the server's"
                )))
            } else {
                Verdict::Ignore
            }
        }
        Statement::Set(Set::SetTimeZone { value, .. }) => time_zone(&value.to_string()),
        Statement::Set(Set::SetNames { .. } | Set::SetNamesDefault { .. }) => Verdict::Ignore,
        Statement::ShowVariable { variable } => {
            let name = variable
                .iter()
                .map(|i| i.value.to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join("_");
            let name = match name.as_str() {
                "time_zone" => "timezone".to_string(),
                "transaction_isolation_level" => "transaction_isolation".to_string(),
                _ => name,
            };
            match server::setting(&name) {
                Some(_) if !CLIENT_SETTINGS.contains(&name.as_str()) => Verdict::Show(name),
                _ => Verdict::Pass,
            }
        }
        // Nothing is ever written, so a savepoint has nothing to keep and a
        // prepared statement nothing to free: drivers send these around
        // reads (SQLAlchemy's first connect, psycopg's nested transactions
        // and prepared-statement cleanup).
        Statement::Savepoint { .. } => Verdict::Acknowledge("SAVEPOINT"),
        Statement::ReleaseSavepoint { .. } => Verdict::Acknowledge("RELEASE"),
        // COPY TO STDOUT, cursors, PREPARE/EXECUTE: checked as they run;
        // datafusion-postgres's FETCH and CLOSE read the cursors back.
        s if statements::owns(s) => Verdict::Statement,
        Statement::Fetch { .. } | Statement::Close { .. } => Verdict::Pass,
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. } => Verdict::Pass,
        other => {
            Verdict::Refuse(guard::check_sql(other).err().unwrap_or_else(|| {
                QueryError::ReadOnly(format!("{} is refused", guard::kind(other)))
            }))
        }
    }
}

/// Sessions answer in UTC and are shared by a principal's connections, so
/// one connection's zone cannot be honoured: UTC (however it is spelled) is
/// accepted, any other zone refused rather than silently ignored.
fn time_zone(value: &str) -> Verdict {
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
        Verdict::Ignore
    } else {
        Verdict::Refuse(QueryError::NotAcceptable(format!(
            "the ledger answers in UTC and cannot switch a session to {zone:?}; convert in the query with AT TIME ZONE '{zone}'"
        )))
    }
}

/// `SHOW name` as the query `SELECT current_setting('name')`, under the
/// column name PostgreSQL uses.
async fn show(ctx: &SessionContext, name: &str) -> Result<(Statement, LogicalPlan), QueryError> {
    let column = if name == "timezone" { "TimeZone" } else { name };
    let sql = format!("SELECT current_setting('{name}') AS \"{column}\"");
    let dialect = datafusion::sql::sqlparser::dialect::PostgreSqlDialect {};
    let statement = datafusion::sql::sqlparser::parser::Parser::parse_sql(&dialect, &sql)
        .ok()
        .and_then(|mut v| v.pop())
        .ok_or_else(|| QueryError::Internal(format!("SHOW {name}: cannot answer")))?;
    let plan = plan(ctx, &statement).await?;
    Ok((statement, plan))
}

impl Bounded {
    async fn show(
        &self,
        ctx: &SessionContext,
        name: &str,
        client: &dyn HookClient,
    ) -> PgWireResult<Response> {
        let (statement, plan) = show(ctx, name).await.map_err(pg_error)?;
        let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
        run_bounded(
            &self.engine,
            ctx,
            (&statement, plan),
            None,
            &Format::UnifiedText,
            options,
        )
        .await
    }
}

#[async_trait]
impl QueryHook for Bounded {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        ctx: &SessionContext,
        client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        match verdict(statement, &self.who) {
            Verdict::Pass => None,
            Verdict::Ignore => Some(Ok(Response::Execution(Tag::new("SET")))),
            Verdict::Acknowledge(tag) => Some(Ok(Response::Execution(Tag::new(tag)))),
            Verdict::Refuse(e) => Some(Err(pg_error(e))),
            Verdict::Show(name) => Some(self.show(ctx, &name, client).await),
            Verdict::Statement => Some(
                statements::run(
                    &self.engine,
                    ctx,
                    statement,
                    None,
                    &Format::UnifiedText,
                    client,
                )
                .await,
            ),
            Verdict::Run => {
                let plan = match plan(ctx, statement).await {
                    Ok(p) => p,
                    Err(e) => return Some(Err(pg_error(e))),
                };
                let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
                Some(
                    run_bounded(
                        &self.engine,
                        ctx,
                        (statement, plan),
                        None,
                        &Format::UnifiedText,
                        options,
                    )
                    .await,
                )
            }
        }
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        ctx: &SessionContext,
        client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        match verdict(statement, &self.who) {
            Verdict::Pass | Verdict::Ignore | Verdict::Acknowledge(_) => None,
            Verdict::Statement => Some(
                statements::describe(ctx, statement, client.metadata())
                    .await
                    .map_err(pg_error),
            ),
            Verdict::Refuse(e) => Some(Err(pg_error(e))),
            Verdict::Show(name) => Some(show(ctx, &name).await.map(|(_, p)| p).map_err(pg_error)),
            Verdict::Run => Some(plan(ctx, statement).await.map_err(pg_error)),
        }
    }

    async fn handle_extended_query(
        &self,
        statement: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        ctx: &SessionContext,
        client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        match verdict(statement, &self.who) {
            Verdict::Ignore => Some(Ok(Response::Execution(Tag::new("SET")))),
            Verdict::Acknowledge(tag) => Some(Ok(Response::Execution(Tag::new(tag)))),
            Verdict::Refuse(e) => Some(Err(pg_error(e))),
            Verdict::Show(name) => Some(self.show(ctx, &name, client).await),
            // The router runs these with the portal's result format.
            Verdict::Pass | Verdict::Run | Verdict::Statement => None,
        }
    }
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
