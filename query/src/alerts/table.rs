//! The recorded alerts as the `alerts` table and `GET /v1/alerts`, through
//! one visibility rule: the admin sees every alert; a consumer sees the
//! alerts of the budgets it can see (as the `budgets` table shows them)
//! and the anomalies of its own spend, never another consumer's or the
//! pipeline's.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Decimal128Builder, Float64Builder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use rust_decimal::Decimal;
use tollgate_schemas::Usd;

use super::alert::Alert;
use super::claims::Records;
use super::config::Kind;
use crate::access::Principal;
use crate::rules::LimitRules;

/// Which alerts a principal may see.
#[derive(Debug, Clone)]
pub struct Visibility {
    /// `None`: every alert (the admin).
    consumer: Option<String>,
    budgets: Vec<String>,
}

impl Visibility {
    pub fn of(who: &Principal, team: Option<&str>, rules: &LimitRules) -> Self {
        match who {
            Principal::Admin => Self {
                consumer: None,
                budgets: Vec::new(),
            },
            Principal::Consumer(name) => Self {
                consumer: Some(name.clone()),
                budgets: (rules.visible_to(Some((name, team))).budgets)
                    .into_iter()
                    .map(|b| b.name)
                    .collect(),
            },
        }
    }

    pub fn sees(&self, a: &Alert) -> bool {
        let Some(me) = &self.consumer else {
            return true;
        };
        match a.kind {
            Kind::Budget | Kind::Forecast => self.budgets.contains(&a.name),
            Kind::Anomaly => a.consumer.as_ref() == Some(me),
            Kind::Pipeline => false,
        }
    }
}

pub fn schema() -> SchemaRef {
    let text = |n: &str, null| Field::new(n, DataType::Utf8, null);
    let ts = |n: &str| {
        Field::new(
            n,
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        )
    };
    let money = |n: &str| Field::new(n, DataType::Decimal128(38, Usd::SCALE as i8), true);
    let num = |n: &str| Field::new(n, DataType::Float64, true);
    Arc::new(Schema::new(vec![
        text("id", false),
        ts("fired_at"),
        text("kind", false),
        text("status", false),
        text("name", false),
        text("message", false),
        text("consumer", true),
        text("model", true),
        ts("period_start"),
        ts("period_end"),
        num("threshold"),
        num("value"),
        money("budget_usd"),
        money("spent_usd"),
        money("projected_usd"),
        money("overspend_usd"),
        ts("exhaustion_at"),
        text("key", false),
        text("source", false),
    ]))
}

/// The alerts as one batch, oldest first.
pub fn batch(alerts: &[Arc<Alert>]) -> Result<RecordBatch> {
    let mut texts: Vec<StringBuilder> = (0..9).map(|_| StringBuilder::new()).collect();
    let ts_col = || TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut times: Vec<TimestampMicrosecondBuilder> = (0..4).map(|_| ts_col()).collect();
    let mut nums: Vec<Float64Builder> = (0..2).map(|_| Float64Builder::new()).collect();
    let money_col =
        || Decimal128Builder::new().with_data_type(DataType::Decimal128(38, Usd::SCALE as i8));
    let mut money: Vec<Decimal128Builder> = (0..4).map(|_| money_col()).collect();
    let scaled = |d: Option<Decimal>| {
        d.map(|mut d| {
            d.rescale(Usd::SCALE);
            d.mantissa()
        })
    };
    let micros = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_micros());
    for a in alerts {
        let t = [
            Some(a.id.as_str()),
            Some(a.kind.as_str()),
            Some(a.status.as_str()),
            Some(a.name.as_str()),
            Some(a.message.as_str()),
            a.consumer.as_deref(),
            a.model.as_deref(),
            Some(a.key.as_str()),
            Some(a.source.as_str()),
        ];
        for (b, v) in texts.iter_mut().zip(t) {
            b.append_option(v);
        }
        let ts = [
            Some(a.fired_at),
            a.period_start,
            a.period_end,
            a.exhaustion_at,
        ];
        for (b, v) in times.iter_mut().zip(ts) {
            b.append_option(micros(v));
        }
        for (b, v) in nums.iter_mut().zip([a.threshold, a.value]) {
            b.append_option(v);
        }
        let m = [a.budget_usd, a.spent_usd, a.projected_usd, a.overspend_usd];
        for (b, v) in money.iter_mut().zip(m) {
            b.append_option(scaled(v));
        }
    }
    let mut t = texts
        .into_iter()
        .map(|mut b| Arc::new(b.finish()) as ArrayRef);
    let mut ts = times
        .into_iter()
        .map(|mut b| Arc::new(b.finish()) as ArrayRef);
    let mut n = nums
        .into_iter()
        .map(|mut b| Arc::new(b.finish()) as ArrayRef);
    let mut m = money
        .into_iter()
        .map(|mut b| Arc::new(b.finish()) as ArrayRef);
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(19);
    let missing = || DataFusionError::Internal("alerts: a column is missing".into());
    cols.push(t.next().ok_or_else(missing)?);
    cols.push(ts.next().ok_or_else(missing)?);
    cols.extend(t.by_ref().take(6));
    cols.extend(ts.by_ref().take(2));
    cols.extend(n.by_ref());
    cols.extend(m.by_ref());
    cols.extend(ts);
    cols.extend(t);
    Ok(RecordBatch::try_new(schema(), cols)?)
}

/// `alerts` in a principal's session.
#[derive(Clone)]
pub struct AlertsTable {
    records: Records,
    visibility: Visibility,
}

impl std::fmt::Debug for AlertsTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertsTable").finish_non_exhaustive()
    }
}

impl AlertsTable {
    pub fn new(records: Records, visibility: Visibility) -> Self {
        Self {
            records,
            visibility,
        }
    }

    /// The alerts the principal sees, oldest first.
    pub async fn visible(&self) -> Result<Vec<Arc<Alert>>> {
        let all = (self.records.all().await).map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(all
            .into_iter()
            .filter(|a| self.visibility.sees(a))
            .collect())
    }
}

#[async_trait]
impl TableProvider for AlertsTable {
    fn schema(&self) -> SchemaRef {
        schema()
    }
    fn table_type(&self) -> TableType {
        TableType::Base
    }
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let batch = batch(&self.visible().await?)?;
        let table = MemTable::try_new(batch.schema(), vec![vec![batch]])?;
        table.scan(state, projection, &[], limit).await
    }
}
