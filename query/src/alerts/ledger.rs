//! The ledger as the alerts read it: spend and rows per hour, by
//! consumer, model and gateway instance, with each budget's share. An hour
//! is summed again only when its files change (a new batch, a late file,
//! a compaction), so a tick reads the current hour, not the month.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Decimal128Type, Int32Type, Int64Type};
use chrono::{DateTime, Utc};
use tollgate_lake::layout;
use tollgate_lake::store::Store;

use super::alert::Budget;
use crate::access::Principal;
use crate::engine::Engine;
use crate::rules;

/// One hour of the ledger.
#[derive(Debug, Clone, Default)]
pub struct Hour {
    /// Of the hour's file names: a change means the sums are stale.
    pub signature: u64,
    pub groups: Vec<Group>,
}

/// Spend and rows of one consumer, model and gateway instance in an hour.
#[derive(Debug, Clone, Default)]
pub struct Group {
    /// Empty when the events have none.
    pub consumer: String,
    /// The model the request was admitted as (what budgets count).
    pub model: String,
    pub instance: String,
    pub rows: u64,
    /// USD in units of 1e-10.
    pub cost: i128,
    /// Per configured budget, in its order.
    pub budgets: Vec<BudgetSums>,
}

/// A budget's share of a group's spend, USD in units of 1e-10.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BudgetSums {
    /// What the budget's scope takes.
    pub all: i128,
    /// ... from the start of its current period.
    pub in_period: i128,
}

/// The hours the alerts look at, kept between ticks.
#[derive(Debug, Default)]
pub struct Index {
    pub hours: BTreeMap<i64, Hour>,
    /// The period starts the sums were cut at; a new period sums again.
    periods: Vec<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("listing the lake: {0}")]
    List(String),
    #[error("summing the ledger: {0}")]
    Query(String),
}

/// More changed hours than this are read as one date range.
const LISTED_HOURS: usize = 24;

impl Index {
    /// Brings the hours from `from` up to date with the lake; returns how
    /// many were summed again.
    pub async fn refresh(
        &mut self,
        engine: &Engine,
        store: &Arc<Store>,
        budgets: &[Budget<'_>],
        fallbacks: &[(String, String)],
        from: i64,
    ) -> Result<usize, LedgerError> {
        let listed = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.list(layout::USAGE))
                .await
                .map_err(|e| LedgerError::List(e.to_string()))?
                .map_err(|e| LedgerError::List(e.to_string()))?
        };
        let mut names: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
        for key in &listed {
            let Some((_, start)) = layout::hour_of(key) else {
                continue;
            };
            let h = start.timestamp();
            if h >= from && key.ends_with(layout::PARQUET) {
                names.entry(h).or_default().push(key.as_str());
            }
        }
        let periods: Vec<DateTime<Utc>> = budgets.iter().map(|b| b.start).collect();
        if periods != self.periods {
            self.hours.clear();
            self.periods = periods;
        }
        self.hours.retain(|h, _| names.contains_key(h));
        let mut changed = BTreeMap::new();
        for (h, keys) in &names {
            let mut hasher = DefaultHasher::new();
            keys.hash(&mut hasher);
            let sig = hasher.finish();
            if self.hours.get(h).is_none_or(|x| x.signature != sig) {
                changed.insert(*h, sig);
            }
        }
        if changed.is_empty() {
            return Ok(0);
        }
        let sums = sum_hours(engine, budgets, fallbacks, &changed).await?;
        for (h, sig) in &changed {
            let groups = sums.get(h).cloned().unwrap_or_default();
            self.hours.insert(
                *h,
                Hour {
                    signature: *sig,
                    groups,
                },
            );
        }
        Ok(changed.len())
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// One statement over the changed hours' partitions.
pub fn statement(
    budgets: &[Budget<'_>],
    fallbacks: &[(String, String)],
    hours: &BTreeSet<i64>,
) -> String {
    let model = rules::admitted_model(fallbacks);
    let mut cols = String::new();
    for (i, b) in budgets.iter().enumerate() {
        let scope = rules::scope_sql(&b.spec.scope, &model);
        let start = quote(&b.start.to_rfc3339());
        cols.push_str(&format!(
            ", CAST(COALESCE(SUM(CASE WHEN TRUE{scope} THEN cost_usd END), 0) AS DECIMAL(38, 10)) AS b{i}\
             , CAST(COALESCE(SUM(CASE WHEN TRUE{scope} AND ts_start >= TIMESTAMP {start} THEN cost_usd END), 0) AS DECIMAL(38, 10)) AS p{i}"
        ));
    }
    let day = |h: i64| {
        DateTime::from_timestamp(h, 0)
            .unwrap_or_default()
            .format("%Y-%m-%d")
            .to_string()
    };
    let filter = match (hours.first(), hours.last()) {
        (Some(&a), Some(&b)) if hours.len() > LISTED_HOURS => {
            format!("date >= DATE '{}' AND date <= DATE '{}'", day(a), day(b))
        }
        _ => hours
            .iter()
            .map(|&h| format!("(date = DATE '{}' AND hour = {})", day(h), (h / 3600) % 24))
            .collect::<Vec<_>>()
            .join(" OR "),
    };
    format!(
        "SELECT date_part('epoch', date) AS day, hour, COALESCE(consumer, '') AS consumer, \
         {model} AS model, COALESCE(gateway_instance, '') AS instance, COUNT(*) AS n, \
         CAST(COALESCE(SUM(cost_usd), 0) AS DECIMAL(38, 10)) AS cost{cols} \
         FROM usage WHERE {filter} GROUP BY 1, 2, 3, 4, 5"
    )
}

async fn sum_hours(
    engine: &Engine,
    budgets: &[Budget<'_>],
    fallbacks: &[(String, String)],
    changed: &BTreeMap<i64, u64>,
) -> Result<BTreeMap<i64, Vec<Group>>, LedgerError> {
    let hours: BTreeSet<i64> = changed.keys().copied().collect();
    let sql = statement(budgets, fallbacks, &hours);
    let out = engine
        .run(&Principal::Admin, &sql)
        .await
        .map_err(|e| LedgerError::Query(e.to_string()))?;
    let mut sums: BTreeMap<i64, Vec<Group>> = BTreeMap::new();
    for batch in &out.batches {
        read_batch(batch, budgets.len(), &mut sums)?;
    }
    Ok(sums)
}

fn read_batch(
    batch: &RecordBatch,
    budgets: usize,
    sums: &mut BTreeMap<i64, Vec<Group>>,
) -> Result<(), LedgerError> {
    let bad = |what: &str| LedgerError::Query(format!("unexpected column {what}"));
    let num = |i: usize| -> Result<Vec<i64>, LedgerError> {
        let c = batch.column(i);
        if let Some(a) = c.as_primitive_opt::<Int64Type>() {
            return Ok(a.iter().map(|v| v.unwrap_or(0)).collect());
        }
        if let Some(a) = c.as_primitive_opt::<Int32Type>() {
            return Ok(a.iter().map(|v| i64::from(v.unwrap_or(0))).collect());
        }
        let f = arrow::compute::cast(c, &arrow::datatypes::DataType::Int64)
            .map_err(|_| bad("number"))?;
        Ok(f.as_primitive::<Int64Type>()
            .iter()
            .map(|v| v.unwrap_or(0))
            .collect())
    };
    let text = |i: usize| -> Result<Vec<String>, LedgerError> {
        let c = arrow::compute::cast(batch.column(i), &arrow::datatypes::DataType::Utf8)
            .map_err(|_| bad("text"))?;
        let s = c.as_string::<i32>();
        Ok((0..s.len())
            .map(|r| {
                if s.is_null(r) {
                    String::new()
                } else {
                    s.value(r).to_string()
                }
            })
            .collect())
    };
    let money = |i: usize| -> Result<Vec<i128>, LedgerError> {
        let a = batch
            .column(i)
            .as_primitive_opt::<Decimal128Type>()
            .ok_or_else(|| bad("money"))?;
        Ok(a.iter().map(|v| v.unwrap_or(0)).collect())
    };
    let (day, hour) = (num(0)?, num(1)?);
    let (consumer, model, instance) = (text(2)?, text(3)?, text(4)?);
    let (rows, cost) = (num(5)?, money(6)?);
    let shares: Vec<(Vec<i128>, Vec<i128>)> = (0..budgets)
        .map(|i| Ok((money(7 + 2 * i)?, money(8 + 2 * i)?)))
        .collect::<Result<_, LedgerError>>()?;
    for r in 0..batch.num_rows() {
        let h = day[r] + 3600 * hour[r];
        sums.entry(h).or_default().push(Group {
            consumer: consumer[r].clone(),
            model: model[r].clone(),
            instance: instance[r].clone(),
            rows: u64::try_from(rows[r]).unwrap_or(0),
            cost: cost[r],
            budgets: shares
                .iter()
                .map(|(all, in_period)| BudgetSums {
                    all: all[r],
                    in_period: in_period[r],
                })
                .collect(),
        });
    }
    Ok(())
}
