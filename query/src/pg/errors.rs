//! Errors on the wire: every one carries the SQLSTATE the HTTP surface
//! would give ([`pg_error`]), including what the engine raised inside
//! datafusion-postgres ([`LogErrors`]), which would otherwise go out as the
//! catch-all `XX000`.

use datafusion_postgres::pgwire::api::{ClientInfo, ErrorHandler};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError};

use std::sync::Arc;

use crate::QueryError;
use crate::engine::Engine;
use crate::metrics::Surface;

/// A [`QueryError`] as the wire's error, with its SQLSTATE.
pub fn pg_error(e: QueryError) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".to_string(),
        e.sqlstate().to_string(),
        e.to_string(),
    )))
}

/// Gives every error its SQLSTATE before it goes out: what the engine
/// raised (a parse, plan or schema error, a limit) is sorted as on HTTP
/// instead of leaving the wire's catch-all `XX000`; then counts it.
pub struct LogErrors {
    pub engine: Arc<Engine>,
}

impl ErrorHandler for LogErrors {
    fn on_error<C: ClientInfo>(&self, _client: &C, error: &mut PgWireError) {
        if let PgWireError::ApiError(inner) = error
            && let Some(sorted) = sorted(inner.as_ref())
        {
            *error = pg_error(sorted);
        }
        // A message quoting what a client sent (a parameter's bytes) may hold
        // a NUL, which ends a protocol string early and breaks the
        // connection: such errors go out with the bytes escaped.
        if !matches!(error, PgWireError::IoError(_)) {
            let taken = std::mem::replace(error, pg_error(QueryError::Internal(String::new())));
            let mut info = ErrorInfo::from(taken);
            if info
                .message
                .contains(|c: char| c.is_control() && c != '\n' && c != '\t')
            {
                info.message = info.message.escape_default().to_string();
            }
            self.engine.metrics().failed(Surface::Pg, &info.code, None);
            *error = PgWireError::UserError(Box::new(info));
        }
        tracing::debug!("pg error: {error}");
    }
}

/// The [`QueryError`] an engine error on the wire stands for.
fn sorted(e: &(dyn std::error::Error + Send + Sync + 'static)) -> Option<QueryError> {
    use datafusion::error::DataFusionError;
    use datafusion::sql::sqlparser::parser::ParserError;
    if let Some(e) = e.downcast_ref::<DataFusionError>() {
        return Some(QueryError::sort(e));
    }
    e.downcast_ref::<ParserError>()
        .map(|p| QueryError::Sql(format!("SQL error: {p}")))
}
