//! The PostgreSQL wire surface, on datafusion-postgres and pgwire.
//!
//! A login is `admin` with the admin token, or a consumer's name with one of
//! its keys (cleartext password, so run it on loopback or behind TLS). Each
//! principal gets its own datafusion-postgres service over its own session,
//! so isolation is the engine's, as on HTTP. Queries are run by
//! [`Bounded`]: checked read-only on the statement and the plan, and within
//! the same limits as HTTP. `SET` is kept to the client settings drivers
//! send; `SET datafusion.*` and the rest of the write or admin statements
//! are refused with SQLSTATE 25006.
//!
//! Its parts: the login and the per-principal services here, then
//! `bounded` (what each statement gets: run, acknowledged, passed on or
//! refused), `run` (one query within the limits, named and typed as
//! PostgreSQL would), `statements` (cursors, PREPARE/EXECUTE) and `copy`
//! (COPY TO STDOUT),
//! [`names`] (PostgreSQL's names for unnamed columns), [`columns`]
//! (`usage` in types clients decode), [`server`] (`version()`,
//! `current_setting()`), [`catalog`] (the `pg_catalog` functions clients
//! call), [`information_schema`] (PostgreSQL's `columns`) and `errors`
//! (every error's SQLSTATE).

mod bounded;
pub mod catalog;
pub mod columns;
mod copy;
mod errors;
mod functions;
pub mod information_schema;
pub mod names;
mod run;
pub mod server;
mod statements;

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::prelude::SessionContext;
use datafusion_postgres::arrow_pg::datatypes::df::deserialize_parameters;
use datafusion_postgres::hooks::QueryHook;
use datafusion_postgres::hooks::cursor::CursorStatementHook;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use datafusion_postgres::pgwire::api::portal::{Format, Portal};
use datafusion_postgres::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use datafusion_postgres::pgwire::api::results::{FieldInfo, Response};
use datafusion_postgres::pgwire::api::stmt::QueryParser;
use datafusion_postgres::pgwire::api::store::PortalStore;
use datafusion_postgres::pgwire::api::{
    ClientInfo, ClientPortalStore, ErrorHandler, PgWireConnectionState, PgWireServerHandlers, Type,
};
use datafusion_postgres::pgwire::error::{PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::startup::Authentication;
use datafusion_postgres::pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use datafusion_postgres::pgwire::types::format::FormatOptions;
use datafusion_postgres::{DfSessionService, Parser};
use futures_util::{Sink, SinkExt};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use bounded::Bounded;
use errors::{LogErrors, pg_error};
use run::run_bounded;

use crate::engine::{Engine, Surface};
use crate::guard;
use crate::{Principal, QueryError};

/// Set by the server after a login succeeds; never taken from the client.
const PRINCIPAL: &str = "tollgate.principal";

fn principal_of<C: ClientInfo + ?Sized>(client: &C) -> PgWireResult<Principal> {
    match client.metadata().get(PRINCIPAL).map(String::as_str) {
        Some("admin") => Ok(Principal::Admin),
        Some(name) => match name.strip_prefix("consumer:") {
            Some(name) => Ok(Principal::Consumer(name.to_string())),
            None => Err(pg_error(QueryError::Unauthenticated(
                "not logged in".into(),
            ))),
        },
        None => Err(pg_error(QueryError::Unauthenticated(
            "not logged in".into(),
        ))),
    }
}

/// Serves until the listener fails.
pub async fn serve(engine: Arc<Engine>, listener: TcpListener) -> std::io::Result<()> {
    let handlers = Arc::new(Handlers::new(engine));
    loop {
        let (socket, peer) = listener.accept().await?;
        let handlers = handlers.clone();
        tokio::spawn(async move {
            if let Err(e) =
                datafusion_postgres::pgwire::tokio::process_socket(socket, None, handlers).await
            {
                tracing::debug!("pg connection from {peer}: {e}");
            }
        });
    }
}

pub struct Handlers {
    login: Arc<Login>,
    router: Arc<Router>,
    errors: Arc<LogErrors>,
}

impl Handlers {
    pub fn new(engine: Arc<Engine>) -> Self {
        let sessions = Arc::new(Sessions {
            engine: engine.clone(),
            services: Mutex::new(HashMap::new()),
        });
        let describe = DfSessionService::new(Arc::new(SessionContext::new())).query_parser();
        Self {
            errors: Arc::new(LogErrors {
                engine: engine.clone(),
            }),
            login: Arc::new(Login { engine }),
            router: Arc::new(Router {
                parser: Arc::new(RouterParser {
                    sessions: sessions.clone(),
                    describe,
                }),
                sessions,
            }),
        }
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.router.clone()
    }
    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.router.clone()
    }
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.login.clone()
    }
    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        self.errors.clone()
    }
}

/// Cleartext password login checked against the admin token and the
/// consumers' key digests.
struct Login {
    engine: Arc<Engine>,
}

#[async_trait]
impl StartupHandler for Login {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                client.metadata_mut().remove(PRINCIPAL);
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client
                    .send(PgWireBackendMessage::Authentication(
                        Authentication::CleartextPassword,
                    ))
                    .await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(pwd) => {
                let pwd = pwd.into_password()?;
                let user = client.metadata().get("user").cloned().unwrap_or_default();
                let who = self
                    .engine
                    .access()
                    .login(&user, &pwd.password)
                    .map_err(|_| PgWireError::InvalidPassword(user.clone()))?;
                let tag = match who {
                    Principal::Admin => "admin".to_string(),
                    Principal::Consumer(name) => format!("consumer:{name}"),
                };
                client.metadata_mut().insert(PRINCIPAL.to_string(), tag);
                finish_authentication(client, &DefaultServerParameterProvider::default()).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// One datafusion-postgres service per principal, over its own session.
struct Sessions {
    engine: Arc<Engine>,
    services: Mutex<HashMap<Principal, Arc<DfSessionService>>>,
}

impl Sessions {
    async fn service<C: ClientInfo + ?Sized>(
        &self,
        client: &C,
    ) -> PgWireResult<(Principal, Arc<DfSessionService>)> {
        let who = principal_of(client)?;
        let mut services = self.services.lock().await;
        if let Some(s) = services.get(&who) {
            return Ok((who, s.clone()));
        }
        let ctx = self
            .engine
            .session_on(&who, Surface::Pg)
            .await
            .map_err(pg_error)?;
        let hooks: Vec<Arc<dyn QueryHook>> = vec![
            Arc::new(Bounded {
                engine: self.engine.clone(),
                who: who.clone(),
            }),
            Arc::new(CursorStatementHook),
            Arc::new(SetShowHook),
            Arc::new(TransactionStatementHook),
        ];
        let service = Arc::new(DfSessionService::new_with_hooks(ctx, hooks));
        services.insert(who.clone(), service.clone());
        Ok((who, service))
    }
}

/// Sends each client to its principal's service.
pub struct Router {
    sessions: Arc<Sessions>,
    parser: Arc<RouterParser>,
}

#[async_trait]
impl SimpleQueryHandler for Router {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (_, service) = self.sessions.service(client).await?;
        SimpleQueryHandler::do_query(service.as_ref(), client, query).await
    }
}

use statements::PgStatement;

/// Parses in the client's own session, so its hooks plan and check.
pub struct RouterParser {
    sessions: Arc<Sessions>,
    /// Parameter and result descriptions need no session.
    describe: Arc<Parser>,
}

#[async_trait]
impl QueryParser for RouterParser {
    type Statement = PgStatement;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        types: &[Option<Type>],
    ) -> PgWireResult<Option<PgStatement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let (_, service) = self.sessions.service(client).await?;
        service.query_parser().parse_sql(client, sql, types).await
    }

    fn get_parameter_types(&self, stmt: &PgStatement) -> PgWireResult<Vec<Type>> {
        self.describe.get_parameter_types(stmt)
    }

    fn get_result_schema(
        &self,
        stmt: &PgStatement,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        let fields = self.describe.get_result_schema(stmt, format)?;
        Ok(match &stmt.1 {
            Some((statement, _)) => {
                let fields = names::apply(statement, Arc::new(fields)).to_vec();
                run::untag_text_cast_fields(statement, fields)
            }
            None => fields,
        })
    }
}

#[async_trait]
impl ExtendedQueryHandler for Router {
    type Statement = PgStatement;
    type QueryParser = RouterParser;

    fn query_parser(&self) -> Arc<RouterParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<PgStatement>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = PgStatement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (who, service) = self.sessions.service(client).await?;
        if let (_, Some((statement, _))) = &portal.statement.statement
            && statements::owns(statement)
        {
            let engine = &self.sessions.engine;
            let ctx = engine
                .session_on(&who, Surface::Pg)
                .await
                .map_err(pg_error)?;
            let types = statements::cursor_parameters(&ctx, statement)
                .await
                .map_err(pg_error)?;
            let inferred: Vec<Option<&arrow::datatypes::DataType>> =
                types.iter().map(Option::as_ref).collect();
            let params = deserialize_parameters(portal, &inferred)?;
            let format = portal.result_column_format.clone();
            return statements::run(engine, &ctx, statement, Some(&params), &format, client).await;
        }
        if let (_, Some((statement, plan))) = &portal.statement.statement
            && guard::check_sql(statement).is_ok()
        {
            let types = plan
                .get_parameter_types()
                .map_err(|e| pg_error(QueryError::from_datafusion(e)))?;
            let inferred = statements::by_position(&types);
            let inferred: Vec<Option<&arrow::datatypes::DataType>> =
                inferred.iter().map(Option::as_ref).collect();
            let params = deserialize_parameters(portal, &inferred)?;
            let engine = &self.sessions.engine;
            let ctx = engine
                .session_on(&who, Surface::Pg)
                .await
                .map_err(pg_error)?;
            let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
            return run_bounded(
                engine,
                &ctx,
                (statement, plan.clone()),
                Some(&params),
                &portal.result_column_format,
                options,
            )
            .await;
        }
        ExtendedQueryHandler::do_query(service.as_ref(), client, portal, max_rows).await
    }
}
