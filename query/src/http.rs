//! The HTTP surface: `POST /v1/sql` and the reports, behind
//! `Authorization: Bearer <admin token or consumer key>`. Errors are JSON
//! bodies `{"error": {"message", "type", "code"}}`, as on the proxy.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tollgate_schemas::credential;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::engine::{Engine, Output};
use crate::metrics::Surface;
use crate::{Principal, QueryError, openapi, reports};

pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// The routes; with `cors_origins`, browsers on those origins (or any, for
/// `*`) may call them.
pub fn router(engine: Arc<Engine>, cors_origins: &[String]) -> Router {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/openapi.json", get(openapi_doc))
        .route("/metrics", get(metrics))
        .route("/v1/sql", post(sql))
        .route("/v1/reports/cost", get(cost))
        .route("/v1/reports/roi", get(roi))
        .route("/v1/alerts", get(alerts))
        .merge(crate::dashboard::routes())
        .fallback(|| async {
            error(QueryError::NotFound(
                "no such endpoint; see /openapi.json".into(),
            ))
        })
        .with_state(engine);
    if cors_origins.is_empty() {
        return router;
    }
    let origins = if cors_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            cors_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    router.layer(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::ACCEPT,
                HeaderName::from_static("x-api-key"),
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

impl QueryError {
    fn status(&self) -> StatusCode {
        match self {
            QueryError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            QueryError::ReadOnly(_) | QueryError::Forbidden(_) => StatusCode::FORBIDDEN,
            QueryError::BadRequest(_)
            | QueryError::Sql(_)
            | QueryError::UndefinedObject(_)
            | QueryError::InvalidStatementName(_)
            | QueryError::DuplicateStatementName(_)
            | QueryError::InvalidCursorName(_) => StatusCode::BAD_REQUEST,
            QueryError::NotFound(_) => StatusCode::NOT_FOUND,
            QueryError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            QueryError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            QueryError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            QueryError::Busy(_) | QueryError::TooManyCursors(_) => StatusCode::TOO_MANY_REQUESTS,
            QueryError::Resources(_) => StatusCode::SERVICE_UNAVAILABLE,
            QueryError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            QueryError::Unauthenticated(_) => "authentication_error",
            QueryError::ReadOnly(_) => "read_only",
            QueryError::Forbidden(_) => "permission_error",
            QueryError::BadRequest(_) => "invalid_request_error",
            QueryError::Sql(_)
            | QueryError::UndefinedObject(_)
            | QueryError::InvalidStatementName(_)
            | QueryError::DuplicateStatementName(_)
            | QueryError::InvalidCursorName(_) => "sql_error",
            QueryError::NotFound(_) => "not_found",
            QueryError::NotAcceptable(_) => "not_acceptable",
            QueryError::Timeout(_) => "timeout",
            QueryError::TooLarge(_) => "result_too_large",
            QueryError::Busy(_) => "too_many_queries",
            QueryError::TooManyCursors(_) => "too_many_cursors",
            QueryError::Resources(_) => "resources_exhausted",
            QueryError::Internal(_) => "server_error",
        }
    }
}

pub fn error(e: QueryError) -> Response {
    let body = serde_json::json!({"error": {
        "message": e.to_string(),
        "type": e.kind(),
        "code": e.sqlstate(),
    }});
    let mut response = (e.status(), Json(body)).into_response();
    if matches!(e, QueryError::Busy(_)) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn principal(engine: &Engine, headers: &HeaderMap) -> Result<Principal, QueryError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let api_key = headers.get("x-api-key").map(HeaderValue::as_bytes);
    let token = credential::presented(authorization, api_key)
        .map_err(|e| QueryError::Unauthenticated(e.to_string()))?;
    let token = std::str::from_utf8(token).map_err(|_| {
        QueryError::Unauthenticated(
            "the token is neither the admin token nor a consumer's key".into(),
        )
    })?;
    engine.access().bearer(token)
}

async fn openapi_doc() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi::DOCUMENT,
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    query: String,
}

/// The answer format from the Accept header: JSON unless CSV or Arrow is
/// asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Csv,
    Arrow,
}

fn format(headers: &HeaderMap) -> Result<Format, QueryError> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(Format::Json);
    };
    for part in accept.split(',') {
        let mime = part
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match mime.as_str() {
            "application/json" | "*/*" | "application/*" | "" => return Ok(Format::Json),
            "text/csv" | "text/*" => return Ok(Format::Csv),
            ARROW_STREAM => return Ok(Format::Arrow),
            _ => {}
        }
    }
    Err(QueryError::NotAcceptable(format!(
        "cannot answer in {accept}: ask for application/json, text/csv or {ARROW_STREAM}"
    )))
}

async fn sql(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let start = Instant::now();
    let answer = async {
        let who = principal(&engine, &headers)?;
        // A body over the limit (2 MiB) is refused in the API's error shape.
        let body = body.map_err(|e| match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => {
                QueryError::TooLarge(format!("the request body is over the limit: {e}"))
            }
            _ => QueryError::BadRequest(format!("cannot read the request body: {e}")),
        })?;
        let format = format(&headers)?;
        let request: SqlRequest = serde_json::from_slice(&body).map_err(|e| {
            QueryError::BadRequest(format!("the body must be {{\"query\": \"<SQL>\"}}: {e}"))
        })?;
        let out = engine.run(&who, &request.query).await?;
        let response = encode(&out, format)?;
        Ok::<_, QueryError>((response, out))
    };
    match answer.await {
        Ok((response, out)) => {
            engine
                .metrics()
                .answered(Surface::Http, start.elapsed(), &out.batches);
            response
        }
        Err(e) => {
            let elapsed = Some(start.elapsed());
            engine
                .metrics()
                .failed(Surface::Http, e.sqlstate(), elapsed);
            error(e)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertsQuery {
    kind: Option<String>,
    status: Option<String>,
    /// RFC 3339; alerts fired at or after it.
    since: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/alerts`: the alerts the caller may see, newest first, as
/// `{"object": "list", "data": [alert, ...]}` (at most `limit`, 100 by
/// default, 1000 at most).
async fn alerts(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    query: Result<axum::extract::Query<AlertsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let answer = async {
        let who = principal(&engine, &headers)?;
        let axum::extract::Query(q) =
            query.map_err(|e| QueryError::BadRequest(format!("alerts: {e}")))?;
        let since = match &q.since {
            None => None,
            Some(s) => Some(chrono::DateTime::parse_from_rfc3339(s).map_err(|e| {
                QueryError::BadRequest(format!(
                    "since: {s:?} is not an RFC 3339 time (2026-01-31T00:00:00Z): {e}"
                ))
            })?),
        };
        if let Some(k) = &q.kind
            && !crate::alerts::config::Kind::ALL
                .iter()
                .any(|x| x.as_str() == k)
        {
            return Err(QueryError::BadRequest(format!(
                "kind: {k:?} is not budget, forecast, anomaly or pipeline"
            )));
        }
        if let Some(st) = &q.status
            && st != "firing"
            && st != "resolved"
        {
            return Err(QueryError::BadRequest(format!(
                "status: {st:?} is not firing or resolved"
            )));
        }
        let limit = q.limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(QueryError::BadRequest(format!(
                "limit: {limit} is not between 1 and 1000"
            )));
        }
        let table = crate::alerts::table::AlertsTable::new(
            engine.records().clone(),
            engine.alert_visibility(&who),
        );
        let all = table
            .visible()
            .await
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        let data: Vec<&crate::alerts::alert::Alert> = all
            .iter()
            .rev()
            .map(|a| a.as_ref())
            .filter(|a| q.kind.as_deref().is_none_or(|k| a.kind.as_str() == k))
            .filter(|a| q.status.as_deref().is_none_or(|s| a.status.as_str() == s))
            .filter(|a| since.is_none_or(|t| a.fired_at >= t))
            .take(limit)
            .collect();
        Ok::<_, QueryError>(
            Json(serde_json::json!({"object": "list", "data": data})).into_response(),
        )
    };
    answer.await.unwrap_or_else(error)
}

async fn metrics(State(engine): State<Arc<Engine>>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (kind, text) = engine.metrics().render(accept);
    ([(header::CONTENT_TYPE, kind)], text).into_response()
}

fn encode(out: &Output, format: Format) -> Result<Response, QueryError> {
    let internal = |e: arrow::error::ArrowError| QueryError::Internal(e.to_string());
    let (mime, bytes) = match format {
        Format::Json => ("application/json", json_rows(&out.batches)?),
        Format::Csv => {
            if let Some(f) = out
                .schema
                .fields()
                .iter()
                .find(|f| f.data_type().is_nested())
            {
                return Err(QueryError::NotAcceptable(format!(
                    "CSV cannot hold the nested column {:?}; select scalar columns or ask for JSON",
                    f.name()
                )));
            }
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(Vec::new());
            for b in &out.batches {
                w.write(b).map_err(internal)?;
            }
            ("text/csv", w.into_inner())
        }
        Format::Arrow => {
            let mut w = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &out.schema)
                .map_err(internal)?;
            for b in &out.batches {
                w.write(b).map_err(internal)?;
            }
            (ARROW_STREAM, w.into_inner().map_err(internal)?)
        }
    };
    Ok(([(header::CONTENT_TYPE, mime)], bytes).into_response())
}

/// An array of row objects; nulls are kept, so every row has every column.
/// Decimals (money) are strings holding the exact value, as in the
/// reports: a JSON number would be read as a float by most clients.
pub fn json_rows(batches: &[RecordBatch]) -> Result<Vec<u8>, QueryError> {
    let mut w = arrow::json::WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, arrow::json::writer::JsonArray>(Vec::new());
    for b in batches {
        w.write(&decimals_as_text(b)?)
            .map_err(|e| QueryError::Internal(e.to_string()))?;
    }
    w.finish()
        .map_err(|e| QueryError::Internal(e.to_string()))?;
    let bytes = w.into_inner();
    Ok(if bytes.is_empty() {
        b"[]".to_vec()
    } else {
        bytes
    })
}

/// `batch` with its decimal columns as exact decimal text without trailing
/// zeros (`0.0246174200` -> `"0.02461742"`, `12.0000` -> `"12"`): the money
/// encoding the reports use.
fn decimals_as_text(batch: &RecordBatch) -> Result<RecordBatch, QueryError> {
    use arrow::array::{Array, AsArray, StringBuilder};
    use arrow::datatypes::{DataType, Field, Schema};
    let is_decimal = |t: &DataType| {
        matches!(
            t,
            DataType::Decimal32(..)
                | DataType::Decimal64(..)
                | DataType::Decimal128(..)
                | DataType::Decimal256(..)
        )
    };
    let schema = batch.schema();
    if !schema.fields().iter().any(|f| is_decimal(f.data_type())) {
        return Ok(batch.clone());
    }
    let internal = |e: arrow::error::ArrowError| QueryError::Internal(e.to_string());
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns = Vec::with_capacity(schema.fields().len());
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        if !is_decimal(field.data_type()) {
            fields.push(field.as_ref().clone());
            columns.push(column.clone());
            continue;
        }
        let text = arrow::compute::cast(column, &DataType::Utf8).map_err(internal)?;
        let text = text.as_string::<i32>();
        let mut out = StringBuilder::with_capacity(text.len(), text.value_data().len());
        for v in text.iter() {
            out.append_option(v.map(|v| match v.contains('.') {
                true => v.trim_end_matches('0').trim_end_matches('.'),
                false => v,
            }));
        }
        fields.push(Field::new(
            field.name(),
            DataType::Utf8,
            field.is_nullable(),
        ));
        columns.push(Arc::new(out.finish()) as arrow::array::ArrayRef);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(internal)
}

async fn cost(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let request = reports::CostRequest::parse(&params, engine.catalogs());
    report(&engine, &headers, async |who| {
        reports::cost(&engine, &who, &request?).await
    })
    .await
}

async fn roi(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let request = reports::RoiRequest::parse(&params, engine.catalogs());
    report(&engine, &headers, async |who| {
        reports::roi(&engine, &who, &request?).await
    })
    .await
}

/// A report for the caller, or the error that stopped it.
async fn report(
    engine: &Engine,
    headers: &HeaderMap,
    run: impl AsyncFnOnce(Principal) -> Result<reports::Report, QueryError>,
) -> Response {
    let start = Instant::now();
    let answer = match principal(engine, headers) {
        Ok(who) => run(who).await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(report) => {
            engine
                .metrics()
                .answered(Surface::Http, start.elapsed(), &[]);
            Json(report).into_response()
        }
        Err(e) => {
            engine
                .metrics()
                .failed(Surface::Http, e.sqlstate(), Some(start.elapsed()));
            error(e)
        }
    }
}
