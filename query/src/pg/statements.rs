//! The read-only statements that are not plain queries, each running its
//! query as [`run_bounded`] does (checked, planned, within the limits):
//! `COPY (query) TO STDOUT` ([`super::copy`]), `DECLARE ... CURSOR FOR query` (`FETCH` and `CLOSE` read the cursor
//! back through datafusion-postgres's hook), and SQL-level `PREPARE`,
//! `EXECUTE` and `DEALLOCATE` (their names are the connection's own, apart
//! from the protocol's statement names).

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::common::{ParamValues, ScalarValue};
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{
    CloseCursor, Declare, DeclareType, DiscardObject, Expr, FetchDirection, Ident, Statement,
};
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::pgwire::api::portal::{Format, Portal};
use datafusion_postgres::pgwire::api::results::{Response, Tag};
use datafusion_postgres::pgwire::api::stmt::StoredStatement;
use datafusion_postgres::pgwire::api::store::{MemPortalStore, PortalStore};
use datafusion_postgres::pgwire::api::{ClientInfo, ClientPortalStore};
use datafusion_postgres::pgwire::error::PgWireResult;
use datafusion_postgres::pgwire::types::format::FormatOptions;

use super::copy::copy_out;
use super::errors::pg_error;
use super::run::{collect_bounded, parse_query, plan, read_query, run_bounded};
use crate::QueryError;
use crate::engine::Engine;
use crate::guard::{self};

/// A statement as the connection's store keeps it: its text, and the
/// statement and plan when it is one the server runs.
pub type PgStatement = (String, Option<(Statement, LogicalPlan)>);

/// What the statements need of a connection, on either protocol: its
/// metadata (client settings, prepared statements) and its cursors.
pub trait Connection: Send {
    fn metadata(&self) -> &HashMap<String, String>;
    fn metadata_mut(&mut self) -> &mut HashMap<String, String>;
    fn cursors(&self) -> Option<&MemPortalStore<PgStatement>>;
}

impl Connection for dyn HookClient + '_ {
    fn metadata(&self) -> &HashMap<String, String> {
        ClientInfo::metadata(self)
    }
    fn metadata_mut(&mut self) -> &mut HashMap<String, String> {
        ClientInfo::metadata_mut(self)
    }
    fn cursors(&self) -> Option<&MemPortalStore<PgStatement>> {
        Some(self.portal_store())
    }
}

impl<C> Connection for C
where
    C: ClientInfo + ClientPortalStore + Send,
    C::PortalStore: PortalStore,
{
    fn metadata(&self) -> &HashMap<String, String> {
        ClientInfo::metadata(self)
    }
    fn metadata_mut(&mut self) -> &mut HashMap<String, String> {
        ClientInfo::metadata_mut(self)
    }
    fn cursors(&self) -> Option<&MemPortalStore<PgStatement>> {
        self.portal_store().as_any().downcast_ref()
    }
}

/// Whether `statement` is one of this module's.
pub fn owns(statement: &Statement) -> bool {
    matches!(
        statement,
        Statement::Copy { .. }
            | Statement::Declare { .. }
            | Statement::Close { .. }
            | Statement::Fetch { .. }
            | Statement::Discard {
                object_type: DiscardObject::ALL
            }
            | Statement::Prepare { .. }
            | Statement::Deallocate { .. }
            | Statement::Execute {
                name: Some(_),
                immediate: false,
                ..
            }
    )
}

/// Runs one of this module's statements; `params` are the protocol's
/// (a cursor's query may have some), `format` the client's for result rows.
pub async fn run<C: Connection + ?Sized>(
    engine: &Engine,
    ctx: &SessionContext,
    statement: &Statement,
    params: Option<&ParamValues>,
    format: &Format,
    conn: &mut C,
) -> PgWireResult<Response> {
    let options = Arc::new(FormatOptions::from_client_metadata(conn.metadata()));
    match statement {
        Statement::Copy { .. } => copy_out(engine, ctx, statement).await,
        Statement::Declare { stmts } => {
            let open = conn
                .metadata()
                .keys()
                .filter(|k| k.starts_with(CURSOR))
                .count();
            // Each cursor's query text, kept so a FETCH can be described.
            let new: Vec<(String, String)> = stmts
                .iter()
                .filter_map(|d| {
                    let query = d.for_query.as_ref()?.to_string();
                    Some((format!("{CURSOR}{}", d.names.first()?.value), query))
                })
                .filter(|(k, _)| !conn.metadata().contains_key(k))
                .collect();
            if open + new.len() > MAX_CURSORS {
                return Err(pg_error(QueryError::TooManyCursors(format!(
                    "a connection holds at most {MAX_CURSORS} open cursors (each keeps its result); CLOSE one first"
                ))));
            }
            let cursors = conn.cursors().ok_or_else(|| {
                pg_error(QueryError::Internal(
                    "the connection keeps no cursors".into(),
                ))
            })?;
            let response = declare(engine, ctx, stmts, params, options, cursors).await?;
            for (key, query) in new {
                conn.metadata_mut().insert(key, query);
            }
            Ok(response)
        }
        Statement::Prepare {
            name, statement, ..
        } => prepare(ctx, name, statement, conn.metadata_mut()).await,
        Statement::Deallocate { name, .. } => deallocate(name, conn.metadata_mut()),
        Statement::Fetch {
            name, direction, ..
        } => {
            let cursors = conn.cursors().ok_or_else(|| {
                pg_error(QueryError::Internal(
                    "the connection keeps no cursors".into(),
                ))
            })?;
            fetch(&name.value, direction, cursors).await
        }
        Statement::Close { cursor } => {
            let name = match cursor {
                CloseCursor::All => None,
                CloseCursor::Specific { name } => Some(name.value.clone()),
            };
            close(name.as_deref(), conn)?;
            Ok(Response::Execution(Tag::new("CLOSE CURSOR")))
        }
        // What a pooler sends between clients: the connection forgets its
        // prepared statements and cursors.
        Statement::Discard { .. } => {
            conn.metadata_mut().retain(|k, _| !k.starts_with(PREPARED));
            close(None, conn)?;
            Ok(Response::Execution(Tag::new("DISCARD ALL")))
        }
        Statement::Execute {
            name: Some(name),
            parameters,
            ..
        } => {
            let name = name.0.last().map(ToString::to_string).unwrap_or_default();
            let name = name.trim_matches('"');
            execute(
                engine,
                ctx,
                (name, parameters),
                conn.metadata(),
                format,
                options,
            )
            .await
        }
        other => Err(pg_error(QueryError::ReadOnly(format!(
            "{} is refused",
            guard::kind(other)
        )))),
    }
}

/// The plan the extended protocol's parse describes for one of this
/// module's statements: an `EXECUTE`'s prepared query (its columns), a
/// cursor's query (its parameters), nothing for the rest.
pub async fn describe(
    ctx: &SessionContext,
    statement: &Statement,
    metadata: &HashMap<String, String>,
) -> Result<LogicalPlan, QueryError> {
    match statement {
        Statement::Execute {
            name: Some(name), ..
        } => {
            let name = name.0.last().map(ToString::to_string).unwrap_or_default();
            Ok(prepared(ctx, name.trim_matches('"'), metadata).await?.1)
        }
        Statement::Fetch { name, .. } => {
            let sql = metadata
                .get(&format!("{CURSOR}{}", name.value))
                .ok_or_else(|| no_cursor(&name.value))?;
            let query = read_query(parse_query(sql)?)?;
            plan(ctx, &query).await
        }
        _ => Ok(LogicalPlan::EmptyRelation(
            datafusion::logical_expr::EmptyRelation {
                produce_one_row: false,
                schema: Arc::new(datafusion::common::DFSchema::empty()),
            },
        )),
    }
}

/// The parameter types a cursor's query gives its `$n`, in order (the
/// protocol's parameters bind to them).
pub async fn cursor_parameters(
    ctx: &SessionContext,
    statement: &Statement,
) -> Result<Vec<Option<arrow::datatypes::DataType>>, QueryError> {
    let Statement::Declare { stmts } = statement else {
        return Ok(vec![]);
    };
    let Some(query) = stmts.first().and_then(|d| d.for_query.clone()) else {
        return Ok(vec![]);
    };
    let planned = plan(ctx, &read_query(Statement::Query(query))?).await?;
    let types = planned
        .get_parameter_types()
        .map_err(QueryError::from_datafusion)?;
    Ok(by_position(&types))
}

/// A plan's parameter types (`$1`, `$2`, ...) by position: a parameter the
/// statement does not use (a driver may bind more than a rewritten
/// statement keeps) has no type, and the client's or text decodes it.
pub fn by_position(
    types: &HashMap<String, Option<arrow::datatypes::DataType>>,
) -> Vec<Option<arrow::datatypes::DataType>> {
    let position = |k: &str| k.trim_start_matches('$').parse::<usize>().ok();
    let len = types.keys().filter_map(|k| position(k)).max().unwrap_or(0);
    let mut out = vec![None; len];
    for (k, t) in types {
        if let Some(i) = position(k).filter(|i| *i >= 1) {
            out[i - 1] = t.clone();
        }
    }
    out
}

/// Open cursors a connection may hold: each holds its whole result (up to
/// the result limits) until it is closed.
pub const MAX_CURSORS: usize = 4;

/// Where a connection notes its open cursors (the portal store cannot be
/// counted).
const CURSOR: &str = "tollgate.cursor.";

fn no_cursor(name: &str) -> QueryError {
    QueryError::InvalidCursorName(format!("cursor \"{name}\" does not exist"))
}

/// `FETCH [n | ALL | NEXT | FORWARD ...] FROM name`: the cursor's next rows.
/// Cursors move forward only.
async fn fetch(
    name: &str,
    direction: &FetchDirection,
    cursors: &MemPortalStore<PgStatement>,
) -> PgWireResult<Response> {
    let count = |v: &datafusion::sql::sqlparser::ast::Value| match v {
        datafusion::sql::sqlparser::ast::Value::Number(n, _) => n.parse::<usize>().ok(),
        _ => None,
    };
    // 0 fetches every remaining row.
    let rows = match direction {
        FetchDirection::Next | FetchDirection::Forward { limit: None } => Some(1),
        FetchDirection::Forward { limit: Some(v) } | FetchDirection::Count { limit: v } => count(v),
        FetchDirection::All | FetchDirection::ForwardAll => Some(0),
        _ => None,
    };
    let Some(rows) = rows else {
        return Err(pg_error(QueryError::NotAcceptable(
            "cursors fetch forward only: FETCH [n | NEXT | ALL | FORWARD n] FROM name".into(),
        )));
    };
    let portal = cursors
        .get_portal(name)
        .and_then(|e| e.value().cloned())
        .ok_or_else(|| pg_error(no_cursor(name)))?;
    Ok(Response::Query(portal.fetch(rows).await?.response))
}

/// Closes one cursor, or all of them.
fn close<C: Connection + ?Sized>(name: Option<&str>, conn: &mut C) -> PgWireResult<()> {
    let cursors = conn.cursors().ok_or_else(|| {
        pg_error(QueryError::Internal(
            "the connection keeps no cursors".into(),
        ))
    })?;
    match name {
        Some(name) => {
            cursors.rm_portal(name);
            conn.metadata_mut().remove(&format!("{CURSOR}{name}"));
        }
        None => {
            cursors.clear_portals();
            conn.metadata_mut().retain(|k, _| !k.starts_with(CURSOR));
        }
    }
    Ok(())
}

/// `DECLARE name CURSOR FOR query`: the query runs now, within the limits,
/// and its rows wait in the connection's portal `name` for `FETCH`; at most
/// [`MAX_CURSORS`] at a time.
pub async fn declare(
    engine: &Engine,
    ctx: &SessionContext,
    declares: &[Declare],
    params: Option<&ParamValues>,
    options: Arc<FormatOptions>,
    store: &MemPortalStore<PgStatement>,
) -> PgWireResult<Response> {
    for declare in declares {
        if declare.declare_type != Some(DeclareType::Cursor) {
            return Err(pg_error(QueryError::NotAcceptable(
                "only DECLARE ... CURSOR FOR a query is accepted".into(),
            )));
        }
        let (Some(name), Some(query)) = (declare.names.first(), &declare.for_query) else {
            return Err(pg_error(QueryError::Sql(
                "DECLARE needs a cursor name and FOR a query".into(),
            )));
        };
        let query = read_query(Statement::Query(query.clone())).map_err(pg_error)?;
        let planned = plan(ctx, &query).await.map_err(pg_error)?;
        let Response::Query(rows) = run_bounded(
            engine,
            ctx,
            (&query, planned.clone()),
            params,
            &Format::UnifiedText,
            options.clone(),
        )
        .await?
        else {
            return Err(pg_error(QueryError::Internal(
                "a cursor's query returned no rows".into(),
            )));
        };
        let stored = StoredStatement::new(
            name.value.clone(),
            (query.to_string(), Some((query, planned))),
            vec![],
        );
        let portal = Portal::new_cursor(name.value.clone(), Arc::new(stored));
        portal.start(rows).await;
        store.put_portal(Arc::new(portal));
    }
    Ok(Response::Execution(Tag::new("DECLARE CURSOR")))
}

/// Where a connection keeps the text of its SQL-level prepared statements:
/// in its own metadata, so each connection has its own names, they go with
/// it, and the extended protocol's parse (which sees only the metadata) can
/// describe an `EXECUTE`'s columns.
const PREPARED: &str = "tollgate.prepared.";

/// `PREPARE name AS query`: checked and planned now, kept on the connection.
pub async fn prepare(
    ctx: &SessionContext,
    name: &Ident,
    statement: &Statement,
    metadata: &mut HashMap<String, String>,
) -> PgWireResult<Response> {
    let query = read_query(statement.clone()).map_err(pg_error)?;
    plan(ctx, &query).await.map_err(pg_error)?;
    let key = format!("{PREPARED}{}", name.value);
    if metadata.contains_key(&key) {
        return Err(pg_error(QueryError::DuplicateStatementName(format!(
            "prepared statement \"{}\" already exists",
            name.value
        ))));
    }
    metadata.insert(key, query.to_string());
    Ok(Response::Execution(Tag::new("PREPARE")))
}

/// `DEALLOCATE [PREPARE] name | ALL`.
pub fn deallocate(name: &Ident, metadata: &mut HashMap<String, String>) -> PgWireResult<Response> {
    if name.value.eq_ignore_ascii_case("all") && name.quote_style.is_none() {
        metadata.retain(|k, _| !k.starts_with(PREPARED));
    } else if metadata
        .remove(&format!("{PREPARED}{}", name.value))
        .is_none()
    {
        return Err(pg_error(missing(&name.value)));
    }
    Ok(Response::Execution(Tag::new("DEALLOCATE")))
}

fn missing(name: &str) -> QueryError {
    QueryError::InvalidStatementName(format!("prepared statement \"{name}\" does not exist"))
}

/// The query prepared as `name` on this connection, planned.
pub async fn prepared(
    ctx: &SessionContext,
    name: &str,
    metadata: &HashMap<String, String>,
) -> Result<(Statement, LogicalPlan), QueryError> {
    let sql = metadata
        .get(&format!("{PREPARED}{name}"))
        .ok_or_else(|| missing(name))?;
    let query = read_query(parse_query(sql)?)?;
    let planned = plan(ctx, &query).await?;
    Ok((query, planned))
}

/// `EXECUTE name(arguments)`: the prepared query with its parameters bound
/// to the arguments, each computed by the engine and cast to the type the
/// plan gives its parameter.
pub async fn execute(
    engine: &Engine,
    ctx: &SessionContext,
    (name, arguments): (&str, &[Expr]),
    metadata: &HashMap<String, String>,
    format: &Format,
    options: Arc<FormatOptions>,
) -> PgWireResult<Response> {
    let (query, planned) = prepared(ctx, name, metadata).await.map_err(pg_error)?;
    let params = arguments_of(engine, ctx, &planned, arguments)
        .await
        .map_err(pg_error)?;
    run_bounded(
        engine,
        ctx,
        (&query, planned),
        Some(&params),
        format,
        options,
    )
    .await
}

async fn arguments_of(
    engine: &Engine,
    ctx: &SessionContext,
    planned: &LogicalPlan,
    arguments: &[Expr],
) -> Result<ParamValues, QueryError> {
    let types = planned
        .get_parameter_types()
        .map_err(QueryError::from_datafusion)?;
    if types.len() != arguments.len() {
        return Err(QueryError::Sql(format!(
            "wrong number of parameters for prepared statement: expected {}, got {}",
            types.len(),
            arguments.len()
        )));
    }
    if arguments.is_empty() {
        return Ok(ParamValues::from(Vec::<ScalarValue>::new()));
    }
    let list = arguments
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let select = read_query(parse_query(&format!("SELECT {list}"))?)?;
    let select_plan = plan(ctx, &select).await?;
    let (_, batches) = collect_bounded(engine, ctx, &select, select_plan, None).await?;
    let row = batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .ok_or_else(|| QueryError::Internal("EXECUTE arguments gave no row".into()))?;
    let mut values = Vec::with_capacity(arguments.len());
    for (i, column) in row.columns().iter().enumerate() {
        let value = ScalarValue::try_from_array(column, 0).map_err(QueryError::from_datafusion)?;
        let want = types.get(&format!("${}", i + 1)).cloned().flatten();
        values.push(match want {
            Some(t) if value.data_type() != t => {
                value.cast_to(&t).map_err(QueryError::from_datafusion)?
            }
            _ => value,
        });
    }
    Ok(ParamValues::from(values))
}
