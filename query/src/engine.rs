//! The engine: one DataFusion runtime (memory pool, caches) shared by one
//! session per principal. The admin's session reads the lake table; a
//! consumer's session has in its place a view filtered to that consumer, so
//! every path (subqueries, CTEs, UNION, views, reports, the PostgreSQL wire)
//! reads through the filter.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{DataFrame, SessionConfig, SessionContext};
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog;
use tokio::sync::Mutex;
use tollgate_lake::layout;
use tollgate_schemas::PriceCatalog;

use crate::access::{Access, Principal};
use crate::guard::{self, Allowed};
use crate::limits::Gate;
use crate::settings::QuerySettings;
use crate::{QueryError, tables};

pub const CATALOG: &str = "tollgate";

pub const ANALYZE_IS_ADMIN: &str =
    "EXPLAIN ANALYZE shows row counts of the whole lake: it is for the admin token";

/// A finished query: its schema (also when there are no rows) and batches.
pub struct Output {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

/// Which surface a session serves: the same tables, but on the PostgreSQL
/// wire `usage` shows its columns in types clients decode
/// ([`crate::pg::columns`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Surface {
    Http,
    Pg,
}

pub struct Engine {
    runtime: Arc<RuntimeEnv>,
    lake: Arc<dyn TableProvider>,
    prices: Arc<dyn TableProvider>,
    catalogs: Vec<PriceCatalog>,
    access: Access,
    gate: Arc<Gate>,
    partitions: usize,
    sessions: Mutex<HashMap<(Principal, Surface), Arc<SessionContext>>>,
    metrics: crate::metrics::QueryMetrics,
    rules: crate::rules::LimitRules,
    /// The lake's objects, for the alerts.
    store: Arc<tollgate_lake::store::Store>,
    records: crate::alerts::claims::Records,
}

fn df(e: datafusion::error::DataFusionError) -> QueryError {
    QueryError::from_datafusion(e)
}

impl Engine {
    pub async fn open(settings: &QuerySettings) -> Result<Arc<Engine>, QueryError> {
        let limits = settings.limits.clone();
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(limits.memory_bytes, 1.0)
            // No spilling: a query over the limit fails, it never writes files.
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            // Listings are not cached, so a published file is visible at
            // once; each file's footer is, checked against its size and
            // modification time.
            .with_cache_manager(
                CacheManagerConfig::default()
                    .with_list_files_cache_limit(0)
                    .with_metadata_cache_limit(settings.cache_bytes),
            )
            .build_arc()
            .map_err(df)?;
        let lake_url = match settings.lake.strip_prefix("s3://") {
            Some(rest) => {
                let bucket = rest.split('/').next().unwrap_or(rest);
                let store = tollgate_lake::store::s3_bucket(bucket, &settings.lake_options)
                    .map_err(|e| QueryError::Internal(e.to_string()))?;
                let url = ObjectStoreUrl::parse(format!("s3://{bucket}")).map_err(df)?;
                runtime.register_object_store(url.as_ref(), store);
                settings.lake.clone()
            }
            None => {
                let dir = std::path::Path::new(&settings.lake);
                std::fs::create_dir_all(dir.join(layout::USAGE)).map_err(|e| {
                    QueryError::Internal(format!(
                        "cannot create the lake at {}: {e}",
                        dir.display()
                    ))
                })?;
                let abs = dir
                    .canonicalize()
                    .map_err(|e| QueryError::Internal(format!("lake {}: {e}", dir.display())))?;
                format!("file://{}", abs.display())
            }
        };
        let lake = tables::lake_table(&lake_url).map_err(df)?;
        let store = tollgate_lake::store::Store::open(&settings.lake, &settings.lake_options)
            .map(Arc::new)
            .map_err(|e| QueryError::Internal(format!("lake {}: {e}", settings.lake)))?;
        let records = crate::alerts::claims::Records::new(store.clone());
        let prices = tables::prices_table(&settings.catalogs).map_err(df)?;
        let gate = Gate::new(limits);
        gate.watch_memory();
        Ok(Arc::new(Engine {
            runtime,
            lake,
            prices,
            catalogs: settings.catalogs.clone(),
            access: Access::new(settings.admin_token.as_deref(), settings.tenants.clone()),
            gate,
            partitions: settings.partitions.max(1),
            sessions: Mutex::new(HashMap::new()),
            metrics: crate::metrics::QueryMetrics::new(),
            rules: settings.rules.clone(),
            store,
            records,
        }))
    }

    /// The lake's objects (listing, conditional writes) for the alerts.
    pub fn store(&self) -> &Arc<tollgate_lake::store::Store> {
        &self.store
    }

    /// The recorded alerts.
    pub fn records(&self) -> &crate::alerts::claims::Records {
        &self.records
    }

    /// The gateway's limit rules.
    pub fn rules(&self) -> &crate::rules::LimitRules {
        &self.rules
    }

    /// What `who` may see of the alerts.
    pub fn alert_visibility(&self, who: &Principal) -> crate::alerts::table::Visibility {
        let team = match who {
            Principal::Admin => None,
            Principal::Consumer(name) => self.access.team_of(name),
        };
        crate::alerts::table::Visibility::of(who, team, &self.rules)
    }

    pub fn access(&self) -> &Access {
        &self.access
    }

    /// Every query's count, duration and result size, for `/metrics`.
    pub fn metrics(&self) -> &crate::metrics::QueryMetrics {
        &self.metrics
    }

    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// Loaded catalogs; the first prices new events.
    pub fn catalogs(&self) -> &[PriceCatalog] {
        &self.catalogs
    }

    /// The principal's session on the HTTP surface (and for the reports),
    /// built on first use.
    pub async fn session(&self, who: &Principal) -> Result<Arc<SessionContext>, QueryError> {
        self.session_on(who, Surface::Http).await
    }

    /// The principal's session on `surface`, built on first use.
    pub async fn session_on(
        &self,
        who: &Principal,
        surface: Surface,
    ) -> Result<Arc<SessionContext>, QueryError> {
        let mut sessions = self.sessions.lock().await;
        let key = (who.clone(), surface);
        if let Some(ctx) = sessions.get(&key) {
            return Ok(ctx.clone());
        }
        let ctx = Arc::new(self.build_session(who, surface).await?);
        sessions.insert(key, ctx.clone());
        Ok(ctx)
    }

    async fn build_session(
        &self,
        who: &Principal,
        surface: Surface,
    ) -> Result<SessionContext, QueryError> {
        // DATAFUSION_* variables tune the engine (e.g.
        // DATAFUSION_EXECUTION_BATCH_SIZE); clients cannot.
        let mut config = SessionConfig::from_env()
            .map_err(df)?
            // The PostgreSQL surface has PostgreSQL's (registered below).
            .with_information_schema(surface == Surface::Http)
            .with_default_catalog_and_schema(CATALOG, "public");
        let unset = |name: &str| std::env::var_os(name).is_none();
        if unset("DATAFUSION_EXECUTION_COLLECT_STATISTICS") {
            // Merging 50 columns' statistics over hundreds of hourly files
            // at every plan costs more than the file pruning it buys: the
            // partition directories and each footer's row-group statistics
            // prune as well (measured: the per-team query 520 -> 454 ms).
            config = config.with_collect_statistics(false);
        }
        if unset("DATAFUSION_EXECUTION_TARGET_PARTITIONS") {
            config = config.with_target_partitions(self.partitions);
        }
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(self.runtime.clone())
            .with_default_features()
            .build();
        let ctx = SessionContext::new_with_state(state);
        let usage = match who {
            Principal::Admin => self.lake.clone(),
            Principal::Consumer(name) => {
                Arc::new(crate::tenant::TenantTable::new(self.lake.clone(), name))
                    as Arc<dyn TableProvider>
            }
        };
        ctx.register_table("usage", usage).map_err(df)?;
        ctx.register_table("prices", self.prices.clone())
            .map_err(df)?;
        let rules = match who {
            Principal::Admin => self.rules.clone(),
            Principal::Consumer(name) => self
                .rules
                .visible_to(Some((name, self.access.team_of(name)))),
        };
        ctx.register_table(
            "rate_limits",
            crate::rules::rate_limits_table(&rules.rate_limits).map_err(df)?,
        )
        .map_err(df)?;
        let alerts = crate::alerts::table::AlertsTable::new(
            self.records.clone(),
            self.alert_visibility(who),
        );
        ctx.register_table("alerts", Arc::new(alerts)).map_err(df)?;
        let budgets = crate::rules::BudgetsTable::new(self.lake.clone(), rules);
        ctx.register_table("budgets", Arc::new(budgets))
            .map_err(df)?;
        for (name, sql) in tables::VIEWS {
            ctx.sql(&format!("CREATE VIEW {name} AS {sql}"))
                .await
                .map_err(|e| QueryError::Internal(format!("view {name}: {e}")))?;
        }
        crate::generators::install(&ctx, self.gate.limits().max_generated_rows);
        if surface == Surface::Pg {
            crate::pg::columns::install(&ctx);
            crate::pg::server::install(&ctx);
            crate::pg::catalog::install(&ctx);
            let info = crate::pg::information_schema::PgInformationSchema::new(
                ctx.state().catalog_list().clone(),
            );
            ctx.catalog(CATALOG)
                .ok_or_else(|| QueryError::Internal(format!("no catalog {CATALOG}")))?
                .register_schema(crate::pg::information_schema::NAME, Arc::new(info))
                .map_err(df)?;
            crate::pg::columns::wire_view(&ctx, "usage")
                .await
                .map_err(|e| QueryError::Internal(format!("usage on the wire: {e}")))?;
        }
        let roles = match who {
            Principal::Admin => std::iter::once("admin")
                .chain(self.access().tenant_names())
                .map(str::to_string)
                .collect(),
            Principal::Consumer(name) => vec![name.clone()],
        };
        setup_pg_catalog(&ctx, CATALOG, crate::pg::catalog::Roles(Arc::new(roles)))
            .map_err(|e| QueryError::Internal(format!("pg_catalog: {e}")))?;
        Ok(ctx)
    }

    /// Parses, checks and plans one statement in the principal's session.
    pub async fn plan(
        &self,
        who: &Principal,
        sql: &str,
    ) -> Result<(Arc<SessionContext>, LogicalPlan), QueryError> {
        let statement = guard::parse_one(sql)?;
        let allowed = guard::check(&statement)?;
        if allowed == (Allowed::Explain { analyze: true }) && *who != Principal::Admin {
            return Err(QueryError::Forbidden(ANALYZE_IS_ADMIN.into()));
        }
        let ctx = self.session(who).await?;
        let plan = ctx.state().statement_to_plan(statement).await.map_err(df)?;
        guard::verify(&plan)?;
        Ok((ctx, plan))
    }

    /// One SQL statement, start to finish, within every limit.
    pub async fn run(&self, who: &Principal, sql: &str) -> Result<Output, QueryError> {
        let _slot = self.gate.enter()?;
        self.gate
            .bounded(async {
                let (ctx, plan) = self.plan(who, sql).await?;
                let frame = ctx.execute_logical_plan(plan).await.map_err(df)?;
                self.drain(frame).await
            })
            .await
    }

    /// A built query (the reports') within every limit.
    pub async fn run_frame(&self, frame: DataFrame) -> Result<Output, QueryError> {
        let _slot = self.gate.enter()?;
        self.gate.bounded(self.drain(frame)).await
    }

    async fn drain(&self, frame: DataFrame) -> Result<Output, QueryError> {
        let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
        let stream = frame.execute_stream().await.map_err(df)?;
        let batches = self.gate.collect(stream).await?;
        Ok(Output { schema, batches })
    }
}
