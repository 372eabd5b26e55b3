//! The read-only statements that are not plain queries, each running its
//! query as [`run_bounded`] does (checked, planned, within the limits):
//! `COPY (query) TO STDOUT` and `COPY table TO STDOUT` (text, CSV, binary),
//! `DECLARE ... CURSOR FOR query` (`FETCH` and `CLOSE` read the cursor
//! back through datafusion-postgres's hook), and SQL-level `PREPARE`,
//! `EXECUTE` and `DEALLOCATE` (their names are the connection's own, apart
//! from the protocol's statement names).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Declare,
    DeclareType, Expr, Ident, Statement,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion_postgres::arrow_pg::datatypes::arrow_schema_to_pg_fields;
use datafusion_postgres::arrow_pg::encoder::{Encoder, encode_value};
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::pgwire::api::portal::{Format, Portal};
use datafusion_postgres::pgwire::api::{ClientInfo, ClientPortalStore};
use datafusion_postgres::pgwire::api::results::{
    CopyCsvOptions, CopyEncoder, CopyResponse, CopyTextOptions, Response, Tag,
};
use datafusion_postgres::pgwire::api::stmt::StoredStatement;
use datafusion_postgres::pgwire::api::store::{MemPortalStore, PortalStore};
use datafusion_postgres::pgwire::error::PgWireResult;
use datafusion_postgres::pgwire::messages::copy::CopyData;
use datafusion_postgres::pgwire::types::format::FormatOptions;

use super::bounded::{collect_bounded, plan, run_bounded};
use super::errors::pg_error;
use super::names;
use crate::QueryError;
use crate::engine::Engine;
use crate::guard::{self, Allowed};

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
            let cursors = conn.cursors().ok_or_else(|| {
                pg_error(QueryError::Internal("the connection keeps no cursors".into()))
            })?;
            declare(engine, ctx, stmts, params, options, cursors).await
        }
        Statement::Prepare {
            name, statement, ..
        } => prepare(ctx, name, statement, conn.metadata_mut()).await,
        Statement::Deallocate { name, .. } => deallocate(name, conn.metadata_mut()),
        Statement::Execute {
            name: Some(name),
            parameters,
            ..
        } => {
            let name = name.0.last().map(ToString::to_string).unwrap_or_default();
            let name = name.trim_matches('"');
            execute(engine, ctx, (name, parameters), conn.metadata(), format, options).await
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

/// What a refused `COPY` says.
const COPY_READS_ONLY: &str = "COPY is accepted only as COPY (query) TO STDOUT or COPY table TO STDOUT: the ledger is read-only and the server's files are its own";

/// The query a statement wraps, checked to be one that only reads.
fn read_query(statement: Statement) -> Result<Statement, QueryError> {
    match guard::check_sql(&statement)? {
        Allowed::Query => Ok(statement),
        Allowed::Explain { .. } => Err(QueryError::NotAcceptable(
            "EXPLAIN cannot be wrapped in COPY, a cursor or a prepared statement".into(),
        )),
    }
}

fn parse_query(sql: &str) -> Result<Statement, QueryError> {
    Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|e| QueryError::Sql(e.to_string()))?
        .pop()
        .ok_or_else(|| QueryError::Sql("empty statement".into()))
}

/// The output format and options of a `COPY ... TO STDOUT`.
enum CopyFormat {
    Text(CopyTextOptions),
    Csv {
        options: CopyCsvOptions,
        header: bool,
        force_quote: Vec<Ident>,
    },
    Binary,
}

impl CopyFormat {
    fn of(options: &[CopyOption], legacy: &[CopyLegacyOption]) -> Result<Self, QueryError> {
        let (mut format, mut header) = ("text".to_string(), false);
        let (mut delimiter, mut null, mut quote, mut escape) = (None, None, None, None);
        let mut force_quote = Vec::new();
        for option in options {
            match option {
                CopyOption::Format(name) => format = name.value.to_ascii_lowercase(),
                CopyOption::Delimiter(c) => delimiter = Some(*c),
                CopyOption::Null(s) => null = Some(s.clone()),
                CopyOption::Header(h) => header = *h,
                CopyOption::Quote(c) => quote = Some(*c),
                CopyOption::Escape(c) => escape = Some(*c),
                CopyOption::ForceQuote(cols) => force_quote.extend(cols.iter().cloned()),
                CopyOption::Encoding(e) if e.eq_ignore_ascii_case("utf8") => {}
                CopyOption::Encoding(e) if e.eq_ignore_ascii_case("utf-8") => {}
                other => {
                    return Err(QueryError::NotAcceptable(format!(
                        "COPY option {other} is not supported on COPY TO STDOUT"
                    )));
                }
            }
        }
        for option in legacy {
            match option {
                CopyLegacyOption::Binary => format = "binary".into(),
                CopyLegacyOption::Delimiter(c) => delimiter = Some(*c),
                CopyLegacyOption::Null(s) => null = Some(s.clone()),
                CopyLegacyOption::Header => header = true,
                CopyLegacyOption::Csv(csv) => {
                    format = "csv".into();
                    for o in csv {
                        match o {
                            CopyLegacyCsvOption::Header => header = true,
                            CopyLegacyCsvOption::Quote(c) => quote = Some(*c),
                            CopyLegacyCsvOption::Escape(c) => escape = Some(*c),
                            CopyLegacyCsvOption::ForceQuote(cols) => {
                                force_quote.extend(cols.iter().cloned())
                            }
                            CopyLegacyCsvOption::ForceNotNull(_) => {
                                return Err(QueryError::NotAcceptable(
                                    "FORCE NOT NULL is only for COPY FROM".into(),
                                ));
                            }
                        }
                    }
                }
                other => {
                    return Err(QueryError::NotAcceptable(format!(
                        "COPY option {other} is not supported on COPY TO STDOUT"
                    )));
                }
            }
        }
        match format.as_str() {
            "text" => {
                let mut o = CopyTextOptions::default();
                if let Some(d) = delimiter {
                    o.delimiter = d.to_string().into();
                }
                if let Some(n) = null {
                    o.null_string = n.into();
                }
                if header {
                    return Err(QueryError::NotAcceptable(
                        "COPY HEADER is available only in CSV mode".into(),
                    ));
                }
                Ok(Self::Text(o))
            }
            "csv" => {
                let mut o = CopyCsvOptions::default();
                if let Some(d) = delimiter {
                    o.delimiter = d.to_string().into();
                }
                if let Some(n) = null {
                    o.null_string = n.into();
                }
                if let Some(q) = quote {
                    o.quote = q.to_string().into();
                }
                if let Some(e) = escape {
                    o.escape = e.to_string().into();
                }
                Ok(Self::Csv {
                    options: o,
                    header,
                    force_quote,
                })
            }
            "binary" => Ok(Self::Binary),
            other => Err(QueryError::NotAcceptable(format!(
                "COPY format {other:?} is not recognized (text, csv or binary)"
            ))),
        }
    }
}

/// `COPY (query) TO STDOUT` or `COPY table [(columns)] TO STDOUT`: the
/// query's rows in the copy-out protocol; any other `COPY` is refused.
pub async fn copy_out(
    engine: &Engine,
    ctx: &SessionContext,
    statement: &Statement,
) -> PgWireResult<Response> {
    copy(engine, ctx, statement).await.map_err(pg_error)
}

async fn copy(
    engine: &Engine,
    ctx: &SessionContext,
    statement: &Statement,
) -> Result<Response, QueryError> {
    let Statement::Copy {
        source,
        to: true,
        target: CopyTarget::Stdout,
        options,
        legacy_options,
        ..
    } = statement
    else {
        return Err(QueryError::ReadOnly(COPY_READS_ONLY.into()));
    };
    let format = CopyFormat::of(options, legacy_options)?;
    let query = match source {
        CopySource::Query(q) => Statement::Query(q.clone()),
        CopySource::Table {
            table_name,
            columns,
        } => {
            let columns = if columns.is_empty() {
                "*".to_string()
            } else {
                columns
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            parse_query(&format!("SELECT {columns} FROM {table_name}"))?
        }
    };
    let query = read_query(query)?;
    let planned = plan(ctx, &query).await?;
    let (schema, batches) = collect_bounded(engine, ctx, &query, planned, None).await?;
    let wire = match format {
        CopyFormat::Binary => Format::UnifiedBinary,
        _ => Format::UnifiedText,
    };
    let fields = arrow_schema_to_pg_fields(&schema, &wire, None)
        .map_err(|e| QueryError::Internal(e.to_string()))?;
    let fields = names::apply(&query, Arc::new(fields));
    let columns = fields.len();
    let mut out: Vec<PgWireResult<CopyData>> = Vec::new();
    let (mut encoder, code) = match format {
        CopyFormat::Text(o) => (CopyEncoder::new_text(fields.clone(), o), 0),
        CopyFormat::Binary => (CopyEncoder::new_binary(fields.clone()), 1),
        CopyFormat::Csv {
            mut options,
            header,
            force_quote,
        } => {
            for name in &force_quote {
                match fields.iter().position(|f| f.name() == name.value) {
                    Some(i) => options.force_quote.push(i),
                    None => {
                        return Err(QueryError::UndefinedObject(format!(
                            "FORCE_QUOTE column {:?} is not in the copied columns",
                            name.value
                        )));
                    }
                }
            }
            if header {
                let names: Vec<String> = fields
                    .iter()
                    .map(|f| csv_field(f.name(), &options))
                    .collect();
                let line = names.join(options.delimiter.as_str()) + "\n";
                out.push(Ok(CopyData::new(line.into_bytes().into())));
            }
            (CopyEncoder::new_csv(fields.clone(), options), 0)
        }
    };
    for batch in &batches {
        encode_rows(&mut encoder, batch, &fields, &mut out);
    }
    Ok(Response::CopyOut(CopyResponse::new(
        code,
        columns,
        futures_util::stream::iter(out),
    )))
}

fn encode_rows(
    encoder: &mut CopyEncoder,
    batch: &RecordBatch,
    fields: &[datafusion_postgres::pgwire::api::results::FieldInfo],
    out: &mut Vec<PgWireResult<CopyData>>,
) {
    let schema = batch.schema();
    for row in 0..batch.num_rows() {
        let mut encoded = Ok(());
        for (col, pg_field) in fields.iter().enumerate() {
            encoded = encode_value(
                encoder,
                batch.column(col),
                row,
                schema.field(col),
                pg_field,
            );
            if encoded.is_err() {
                break;
            }
        }
        out.push(encoded.map(|()| Encoder::take_row(encoder)));
    }
}

/// A CSV header field, quoted when it holds a delimiter, quote or newline.
fn csv_field(name: &str, options: &CopyCsvOptions) -> String {
    let quote = options.quote.as_str();
    if name.contains(options.delimiter.as_str())
        || name.contains(quote)
        || name.contains(['\n', '\r'])
    {
        format!("{quote}{}{quote}", name.replace(quote, &format!("{quote}{quote}")))
    } else {
        name.to_string()
    }
}

/// `DECLARE name CURSOR FOR query`: the query runs now, within the limits,
/// and its rows wait in the connection's portal `name` for `FETCH`.
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
    } else if metadata.remove(&format!("{PREPARED}{}", name.value)).is_none() {
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
    run_bounded(engine, ctx, (&query, planned), Some(&params), format, options).await
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
