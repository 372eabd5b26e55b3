//! What a session sees: `usage` (the lake, or for a consumer only its own
//! rows), `prices` (every loaded catalog with validity periods) and the
//! documented views over them.

use std::borrow::Cow;
use std::sync::Arc;

use arrow::array::{ArrayRef, Date32Builder, Decimal128Builder, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::NaiveDate;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::file_format::parquet::{ParquetFormat, transform_schema_to_view};
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::{MemTable, ViewTable};
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, LogicalPlan, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use tollgate_lake::layout;
use tollgate_schemas::{PriceCatalog, Usd};

/// The start of the error a capped generator returns.
pub const TOO_MANY_ROWS: &str = "generated rows over the limit";

/// Documented in the README; created in every session, so each consumer's
/// views read only its own `usage`.
pub const VIEWS: &[(&str, &str)] = &[
    (
        "daily_cost",
        "SELECT date, consumer, team, coalesce(served_model, requested_model) AS model, \
         count(*) AS requests, sum(input_tokens) AS input_tokens, \
         sum(cached_input_tokens) AS cached_input_tokens, sum(output_tokens) AS output_tokens, \
         sum(reasoning_tokens) AS reasoning_tokens, sum(cost_usd) AS cost_usd \
         FROM usage GROUP BY date, consumer, team, coalesce(served_model, requested_model)",
    ),
    (
        "hourly_health",
        "SELECT date_trunc('hour', ts_start) AS hour_start, coalesce(served_model, requested_model) AS model, \
         count(*) AS requests, avg(CASE WHEN status >= 400 THEN 1.0 ELSE 0.0 END) AS error_rate, \
         avg(CASE WHEN fallback THEN 1.0 ELSE 0.0 END) AS fallback_rate, \
         avg(CASE WHEN cache = 'hit' THEN 1.0 ELSE 0.0 END) AS cache_hit_rate, \
         approx_percentile_cont(latency_ms, 0.5) AS latency_p50_ms, \
         approx_percentile_cont(latency_ms, 0.95) AS latency_p95_ms \
         FROM usage GROUP BY date_trunc('hour', ts_start), coalesce(served_model, requested_model)",
    ),
    (
        "cost_by_tag",
        "SELECT date, t.key AS tag, t.value AS tag_value, count(*) AS requests, sum(cost_usd) AS cost_usd \
         FROM (SELECT date, cost_usd, unnest(map_entries(tags)) AS t FROM usage) \
         GROUP BY date, t.key, t.value",
    ),
];

/// The lake's `usage` table: Parquet files under `<lake>/usage/`, with the
/// Hive `date` and `hour` directories as partition columns. Files are
/// listed at every scan, so what the ingester publishes is seen at once.
pub fn lake_table(lake_url: &str) -> Result<Arc<dyn TableProvider>> {
    Ok(Arc::new(PaddedHours(listing_table(lake_url)?)))
}

fn listing_table(lake_url: &str) -> Result<Arc<dyn TableProvider>> {
    let root = lake_url.trim_end_matches('/');
    let url = ListingTableUrl::parse(format!("{root}/{}/", layout::USAGE))?;
    let [date, hour] = layout::PARTITION_COLUMNS;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(layout::PARQUET)
        .with_table_partition_cols(vec![
            (date.to_string(), DataType::Date32),
            (hour.to_string(), DataType::Int32),
        ]);
    // Strings are read as views: a dictionary-encoded page then becomes
    // views into its dictionary, not a copy of every value.
    let file_schema = Arc::new(transform_schema_to_view(&tollgate_schemas::usage_schema()));
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(file_schema);
    Ok(Arc::new(ListingTable::try_new(config)?))
}

/// The lake with `hour = 7` meaning the `hour=07` directory. DataFusion
/// turns equalities on partition columns into a listing prefix written
/// with the literal's own text (`hour=7`), which misses the zero-padded
/// directories and returns no rows for `date = ... AND hour = 7`. As an
/// `IN` list the same filter still prunes, through the parsed values.
#[derive(Debug)]
struct PaddedHours(Arc<dyn TableProvider>);

fn unpadded(filter: &Expr) -> Expr {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    use datafusion::logical_expr::{BinaryExpr, Operator, expr::InList};
    let [_, hour] = layout::PARTITION_COLUMNS;
    let rewritten = filter.clone().transform(|e| {
        let Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) = &e
        else {
            return Ok(Transformed::no(e));
        };
        let (column, value) = match (left.as_ref(), right.as_ref()) {
            (Expr::Column(c), Expr::Literal(..)) => (c, right),
            (Expr::Literal(..), Expr::Column(c)) => (c, left),
            _ => return Ok(Transformed::no(e)),
        };
        if column.name != hour {
            return Ok(Transformed::no(e));
        }
        Ok(Transformed::yes(Expr::InList(InList::new(
            Box::new(Expr::Column(column.clone())),
            vec![value.as_ref().clone()],
            false,
        ))))
    });
    rewritten.map_or_else(|_| filter.clone(), |t| t.data)
}

#[async_trait::async_trait]
impl TableProvider for PaddedHours {
    fn schema(&self) -> SchemaRef {
        self.0.schema()
    }
    fn table_type(&self) -> TableType {
        self.0.table_type()
    }
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let filters: Vec<Expr> = filters.iter().map(unpadded).collect();
        self.0.scan(state, projection, &filters, limit).await
    }
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        let owned: Vec<Expr> = filters.iter().map(|f| unpadded(f)).collect();
        self.0
            .supports_filters_pushdown(&owned.iter().collect::<Vec<_>>())
    }
}

/// A view that catalogs list as a base table: `usage` is the ledger's
/// table to every client (`\dt`, `information_schema.tables`, a BI tool's
/// table list), whatever filtered or converted plan stands behind it.
/// Planning still inlines the view's plan.
#[derive(Debug)]
pub struct Ledger(pub ViewTable);

#[async_trait::async_trait]
impl TableProvider for Ledger {
    fn schema(&self) -> SchemaRef {
        self.0.schema()
    }
    fn table_type(&self) -> TableType {
        TableType::Base
    }
    fn get_logical_plan(&'_ self) -> Option<Cow<'_, LogicalPlan>> {
        self.0.get_logical_plan()
    }
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.0.scan(state, projection, filters, limit).await
    }
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        self.0.supports_filters_pushdown(filters)
    }
}

fn money() -> DataType {
    DataType::Decimal128(38, Usd::SCALE as i8)
}

pub fn prices_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("catalog", DataType::Utf8, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("input_per_million", money(), false),
        Field::new("cached_input_per_million", money(), false),
        Field::new("output_per_million", money(), false),
        Field::new("effective_from", DataType::Date32, false),
        Field::new("effective_to", DataType::Date32, true),
        Field::new("source", DataType::Utf8, false),
    ]))
}

fn days(d: NaiveDate) -> i32 {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    (d - epoch).num_days() as i32
}

/// `prices`: one row per catalog, model name (aliases included) and
/// period; `effective_to` is exclusive and null for the price in force.
/// Join on `name = lower(served_model)` and the request's date to reprice.
pub fn prices_table(catalogs: &[PriceCatalog]) -> Result<Arc<dyn TableProvider>> {
    let mut cat = StringBuilder::new();
    let mut model = StringBuilder::new();
    let mut name = StringBuilder::new();
    let dec = || Decimal128Builder::new().with_data_type(money());
    let (mut input, mut cached, mut output) = (dec(), dec(), dec());
    let mut from = Date32Builder::new();
    let mut to = Date32Builder::new();
    let mut source = StringBuilder::new();
    for catalog in catalogs {
        let entries = catalog.entries();
        for (i, p) in entries.iter().enumerate() {
            let next = entries[i + 1..]
                .iter()
                .find(|q| q.model == p.model)
                .map(|q| days(q.effective_from));
            let names = std::iter::once(&p.model).chain(&p.aliases);
            for n in names {
                cat.append_value(catalog.version());
                model.append_value(&p.model);
                name.append_value(n.to_ascii_lowercase());
                input.append_value(p.input.to_scaled());
                cached.append_value(p.cached_input.to_scaled());
                output.append_value(p.output.to_scaled());
                from.append_value(days(p.effective_from));
                to.append_option(next);
                source.append_value(&p.source);
            }
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(cat.finish()),
        Arc::new(model.finish()),
        Arc::new(name.finish()),
        Arc::new(input.finish()),
        Arc::new(cached.finish()),
        Arc::new(output.finish()),
        Arc::new(from.finish()),
        Arc::new(to.finish()),
        Arc::new(source.finish()),
    ];
    let schema = prices_schema();
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    Ok(Arc::new(MemTable::try_new(schema, vec![vec![batch]])?))
}
