//! `COPY (query) TO STDOUT` and `COPY table [(columns)] TO STDOUT`, in
//! text, CSV or binary: how psql's `\copy`, psycopg's `copy()` and
//! asyncpg's `copy_from_query` export. The query runs as any other
//! ([`super::run`]); every other `COPY` is refused as a write.

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Ident, Statement,
};
use datafusion_postgres::arrow_pg::datatypes::arrow_schema_to_pg_fields;
use datafusion_postgres::arrow_pg::encoder::{Encoder, encode_value};
use datafusion_postgres::pgwire::api::portal::Format;
use datafusion_postgres::pgwire::api::results::{
    CopyCsvOptions, CopyEncoder, CopyResponse, CopyTextOptions, Response,
};
use datafusion_postgres::pgwire::error::PgWireResult;
use datafusion_postgres::pgwire::messages::copy::CopyData;

use super::errors::pg_error;
use super::names;
use super::run::{collect_bounded, parse_query, plan, read_query};
use crate::QueryError;
use crate::engine::Engine;

/// What a refused `COPY` says.
const COPY_READS_ONLY: &str = "COPY is accepted only as COPY (query) TO STDOUT or COPY table TO STDOUT: the ledger is read-only and the server's files are its own";

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
    let mut header_line = None;
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
                header_line = Some(names.join(options.delimiter.as_str()) + "\n");
            }
            (CopyEncoder::new_csv(fields.clone(), options), 0)
        }
    };
    for batch in &batches {
        encode_rows(&mut encoder, batch, &fields, &mut out);
    }
    // The header goes in the first row's message: the command tag counts
    // messages as rows (`COPY n`), and the header is not one.
    if let Some(line) = header_line {
        let mut bytes = line.into_bytes();
        match out.first_mut() {
            Some(Ok(first)) => {
                bytes.extend_from_slice(&first.data);
                first.data = bytes.into();
            }
            _ => out.insert(0, Ok(CopyData::new(bytes.into()))),
        }
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
            encoded = encode_value(encoder, batch.column(col), row, schema.field(col), pg_field);
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
        format!(
            "{quote}{}{quote}",
            name.replace(quote, &format!("{quote}{quote}"))
        )
    } else {
        name.to_string()
    }
}
