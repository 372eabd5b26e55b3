//! The first hook of every session's service: each statement is run within
//! the engine's limits, acknowledged without effect, passed on to the
//! datafusion-postgres hooks (client settings, transactions), or refused.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{
    DiscardObject, Set, Statement, TransactionAccessMode, TransactionMode,
};
use datafusion_postgres::hooks::{HookClient, QueryHook};
use datafusion_postgres::pgwire::api::ClientInfo;
use datafusion_postgres::pgwire::api::portal::Format;
use datafusion_postgres::pgwire::api::results::{Response, Tag};
use datafusion_postgres::pgwire::error::PgWireResult;
use datafusion_postgres::pgwire::types::format::FormatOptions;

use super::errors::pg_error;
use super::run::{plan, run_bounded};
use super::{server, statements};
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
        // Every transaction here reads only: READ ONLY (or an isolation
        // level) is what it already is, READ WRITE cannot be had.
        Statement::Set(Set::SetTransaction { modes, .. }) => {
            if modes.contains(&TransactionMode::AccessMode(
                TransactionAccessMode::ReadWrite,
            )) {
                Verdict::Refuse(QueryError::ReadOnly(
                    "READ WRITE is refused: every transaction on the ledger is read-only".into(),
                ))
            } else {
                Verdict::Acknowledge("SET")
            }
        }
        // What poolers send between clients: the session's settings are the
        // server's and reads leave no state to discard.
        Statement::Reset(_) => Verdict::Acknowledge("RESET"),
        Statement::Discard {
            object_type: DiscardObject::PLANS,
        } => Verdict::Acknowledge("DISCARD PLANS"),
        Statement::Discard {
            object_type: DiscardObject::SEQUENCES,
        } => Verdict::Acknowledge("DISCARD SEQUENCES"),
        Statement::Discard {
            object_type: DiscardObject::TEMP,
        } => Verdict::Acknowledge("DISCARD TEMP"),
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
            if CLIENT_SETTINGS.contains(&name.as_str()) || name == "all" {
                return Verdict::Pass;
            }
            match server::setting(&name) {
                Some(_) => Verdict::Show(name),
                None => Verdict::Refuse(QueryError::UndefinedObject(format!(
                    "{} \"{name}\"",
                    server::UNRECOGNIZED
                ))),
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
    match server::only_utc(value) {
        Ok(()) => Verdict::Ignore,
        Err(message) => Verdict::Refuse(QueryError::NotAcceptable(message)),
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
