//! The gateway's limit rules as tables: `rate_limits` (one row per rule
//! and figure) and `budgets` (one row per budget, with its current
//! period and the spend the lake holds for it), so that a report can show
//! spend against budget. The lake is the truth: `spent_usd` sums
//! `cost_usd` of the period's events the budget's scope takes, the way
//! the gateway counts them (a request a tripped limit sent to a fallback
//! model counts as that model's).
//!
//! The admin sees every rule; a consumer sees the rules whose consumer and
//! team filters could take its requests, and a budget's whole spend.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Decimal128Array, Decimal128Builder, Float64Builder, Int64Builder, RecordBatch,
    StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use rust_decimal::Decimal;
use tollgate_schemas::Usd;
use tollgate_schemas::period::{Period, period_end, period_start};

/// Who a rule applies to, as the config writes it (globs).
#[derive(Debug, Clone, Default)]
pub struct RuleScope {
    pub model: Option<String>,
    pub consumer: Option<String>,
    pub team: Option<String>,
    /// `key=glob` on the request's tags.
    pub tag: Option<String>,
    pub exempt: Vec<String>,
}

/// One figure of a `[[rate_limits]]` rule.
#[derive(Debug, Clone)]
pub struct RateLimitSpec {
    pub name: String,
    pub scope: RuleScope,
    /// `consumer`, `header:x-user`, ...
    pub key: String,
    pub matches: Vec<String>,
    /// `tokens`, `requests` or `usd`.
    pub unit: String,
    /// `second`, `minute`, `hour` or `day`.
    pub window: String,
    /// Tokens, requests or USD.
    pub limit: Decimal,
    pub count: String,
    pub default_output_tokens: u64,
    /// `reject` or `fallback`.
    pub on_limit: String,
    pub fallback: Option<String>,
}

/// One `[[budgets]]` entry.
#[derive(Debug, Clone)]
pub struct BudgetSpec {
    pub name: String,
    pub scope: RuleScope,
    pub usd: Usd,
    pub period: Period,
    pub timezone: Tz,
    pub alert_at: Vec<f64>,
    /// `block`, `alert_only` or `downgrade`.
    pub on_exhausted: String,
    pub downgrade: Option<String>,
}

/// Every rule, and which model each rule's trip sends requests to.
#[derive(Debug, Clone, Default)]
pub struct LimitRules {
    pub rate_limits: Vec<RateLimitSpec>,
    pub budgets: Vec<BudgetSpec>,
    /// (rule name, fallback model)
    pub fallbacks: Vec<(String, String)>,
}

impl RuleScope {
    /// Whether the rule could take requests of `consumer` (in `team`).
    fn may_take(&self, consumer: &str, team: Option<&str>) -> bool {
        let fits = |g: &Option<String>, v: Option<&str>| {
            g.as_ref().is_none_or(|g| {
                glob::Pattern::new(g).is_ok_and(|p| v.is_some_and(|v| p.matches(v)))
            })
        };
        !self.exempt.iter().any(|e| e == consumer)
            && fits(&self.consumer, Some(consumer))
            && fits(&self.team, team)
    }
}

impl LimitRules {
    /// The rules `who` may see (`None`: the admin, all of them).
    pub fn visible_to(&self, who: Option<(&str, Option<&str>)>) -> LimitRules {
        let Some((name, team)) = who else {
            return self.clone();
        };
        LimitRules {
            rate_limits: (self.rate_limits.iter())
                .filter(|r| r.scope.may_take(name, team))
                .cloned()
                .collect(),
            budgets: (self.budgets.iter())
                .filter(|b| b.scope.may_take(name, team))
                .cloned()
                .collect(),
            fallbacks: self.fallbacks.clone(),
        }
    }
}

fn money() -> DataType {
    DataType::Decimal128(38, Usd::SCALE as i8)
}

fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

pub fn rate_limits_schema() -> SchemaRef {
    let text = |n: &str, null| Field::new(n, DataType::Utf8, null);
    Arc::new(Schema::new(vec![
        text("name", false),
        text("model", true),
        text("consumer", true),
        text("team", true),
        text("tag", true),
        text("key", false),
        text("match", true),
        text("unit", false),
        text("window", false),
        Field::new("limit", money(), false),
        text("count", false),
        Field::new("default_output_tokens", DataType::Int64, false),
        text("on_limit", false),
        text("fallback", true),
    ]))
}

/// `rate_limits`: one row per rule and figure, as configured.
pub fn rate_limits_table(rules: &[RateLimitSpec]) -> Result<Arc<dyn TableProvider>> {
    let mut s: Vec<StringBuilder> = (0..11).map(|_| StringBuilder::new()).collect();
    let mut limit = Decimal128Builder::new().with_data_type(money());
    let mut outputs = Int64Builder::new();
    for r in rules {
        let mut scaled = r.limit;
        scaled.rescale(Usd::SCALE);
        let matches = (!r.matches.is_empty()).then(|| r.matches.join(", "));
        let texts = [
            Some(r.name.as_str()),
            r.scope.model.as_deref(),
            r.scope.consumer.as_deref(),
            r.scope.team.as_deref(),
            r.scope.tag.as_deref(),
            Some(r.key.as_str()),
            matches.as_deref(),
            Some(r.unit.as_str()),
            Some(r.window.as_str()),
            Some(r.count.as_str()),
            Some(r.on_limit.as_str()),
        ];
        for (b, v) in s.iter_mut().zip(texts) {
            b.append_option(v);
        }
        limit.append_value(scaled.mantissa());
        outputs.append_value(i64::try_from(r.default_output_tokens).unwrap_or(i64::MAX));
    }
    let mut fallback = StringBuilder::new();
    for r in rules {
        fallback.append_option(r.fallback.as_deref());
    }
    let mut cols: Vec<ArrayRef> = Vec::new();
    let mut it = s.into_iter().map(|mut b| Arc::new(b.finish()) as ArrayRef);
    cols.extend(it.by_ref().take(9));
    cols.push(Arc::new(limit.finish()));
    cols.extend(it);
    cols.insert(11, Arc::new(outputs.finish()));
    cols.push(Arc::new(fallback.finish()));
    let schema = rate_limits_schema();
    let batch = RecordBatch::try_new(schema.clone(), cols)?;
    Ok(Arc::new(MemTable::try_new(schema, vec![vec![batch]])?))
}

pub fn budgets_schema() -> SchemaRef {
    let text = |n: &str, null| Field::new(n, DataType::Utf8, null);
    Arc::new(Schema::new(vec![
        text("name", false),
        text("model", true),
        text("consumer", true),
        text("team", true),
        text("tag", true),
        Field::new("usd", money(), false),
        text("period", false),
        text("timezone", false),
        Field::new("period_start", utc_micros(), false),
        Field::new("period_end", utc_micros(), false),
        text("alert_at", false),
        text("on_exhausted", false),
        text("downgrade", true),
        Field::new("spent_usd", money(), false),
        Field::new("remaining_usd", money(), false),
        Field::new("spent_fraction", DataType::Float64, false),
    ]))
}

/// `budgets`: each budget's current period and spend, computed from the
/// lake when the table is read.
#[derive(Debug)]
pub struct BudgetsTable {
    /// The whole lake: a budget's spend is everyone's in its scope.
    lake: Arc<dyn TableProvider>,
    rules: LimitRules,
}

impl BudgetsTable {
    pub fn new(lake: Arc<dyn TableProvider>, rules: LimitRules) -> Self {
        Self { lake, rules }
    }

    async fn batch(&self, state: &dyn Session) -> Result<RecordBatch> {
        let now = Utc::now();
        let periods: Vec<(DateTime<Utc>, DateTime<Utc>)> = (self.rules.budgets.iter())
            .map(|b| {
                let start = period_start(b.period, b.timezone, now);
                (start, period_end(b.period, b.timezone, start))
            })
            .collect();
        let spent = self.spend(state, &periods).await?;
        let schema = budgets_schema();
        let mut s: Vec<StringBuilder> = (0..10).map(|_| StringBuilder::new()).collect();
        let dec = || Decimal128Builder::new().with_data_type(money());
        let (mut usd, mut spent_col, mut remaining) = (dec(), dec(), dec());
        let mut starts = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut ends = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut fraction = Float64Builder::new();
        for ((b, (start, end)), spent) in self.rules.budgets.iter().zip(&periods).zip(&spent) {
            let alerts: Vec<String> = b.alert_at.iter().map(f64::to_string).collect();
            let alerts = alerts.join(",");
            let texts = [
                Some(b.name.as_str()),
                b.scope.model.as_deref(),
                b.scope.consumer.as_deref(),
                b.scope.team.as_deref(),
                b.scope.tag.as_deref(),
                Some(b.period.as_str()),
                Some(b.timezone.name()),
                Some(alerts.as_str()),
                Some(b.on_exhausted.as_str()),
                b.downgrade.as_deref(),
            ];
            for (builder, v) in s.iter_mut().zip(texts) {
                builder.append_option(v);
            }
            let limit = b.usd.to_scaled();
            usd.append_value(limit);
            spent_col.append_value(*spent);
            remaining.append_value((limit - spent).max(0));
            starts.append_value(start.timestamp_micros());
            ends.append_value(end.timestamp_micros());
            fraction.append_value(if limit > 0 {
                *spent as f64 / limit as f64
            } else {
                f64::from(u8::from(*spent > 0))
            });
        }
        let mut t = s.into_iter().map(|mut b| Arc::new(b.finish()) as ArrayRef);
        let mut cols: Vec<ArrayRef> = t.by_ref().take(5).collect();
        cols.push(Arc::new(usd.finish()));
        cols.extend(t.by_ref().take(2));
        cols.push(Arc::new(starts.finish()));
        cols.push(Arc::new(ends.finish()));
        cols.extend(t);
        cols.push(Arc::new(spent_col.finish()));
        cols.push(Arc::new(remaining.finish()));
        cols.push(Arc::new(fraction.finish()));
        Ok(RecordBatch::try_new(schema, cols)?)
    }

    /// Each budget's spend in its period, in 10^-10 USD: one aggregate over
    /// the lake, in a session of its own (the caller's `usage` may be a
    /// consumer's filtered view).
    async fn spend(
        &self,
        state: &dyn Session,
        periods: &[(DateTime<Utc>, DateTime<Utc>)],
    ) -> Result<Vec<i128>> {
        if periods.is_empty() {
            return Ok(Vec::new());
        }
        let config = (state.config().clone())
            .with_create_default_catalog_and_schema(true)
            .with_default_catalog_and_schema("datafusion", "public");
        let ctx = SessionContext::new_with_config_rt(config, state.runtime_env().clone());
        ctx.register_table("usage", self.lake.clone())?;
        let model = admitted_model(&self.rules.fallbacks);
        let parts: Vec<String> = (self.rules.budgets.iter())
            .zip(periods)
            .enumerate()
            .map(|(i, (b, (start, end)))| {
                format!(
                    "SELECT {i} AS i, CAST(COALESCE(SUM(cost_usd), 0) AS DECIMAL(38, 10)) AS spent \
                     FROM usage WHERE date >= DATE '{}' AND date <= DATE '{}' \
                     AND ts_start >= TIMESTAMP '{}' AND ts_start < TIMESTAMP '{}'{}",
                    start.date_naive(),
                    end.date_naive(),
                    start.to_rfc3339(),
                    end.to_rfc3339(),
                    scope_sql(&b.scope, &model)
                )
            })
            .collect();
        let batches = ctx.sql(&parts.join(" UNION ALL ")).await?.collect().await?;
        let mut out = vec![0i128; periods.len()];
        for batch in batches {
            let (Some(idx), Some(spent)) = (
                batch
                    .column(0)
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>(),
                batch.column(1).as_any().downcast_ref::<Decimal128Array>(),
            ) else {
                return Err(DataFusionError::Internal(
                    "budget spend: unexpected columns".into(),
                ));
            };
            for r in 0..batch.num_rows() {
                if let Some(slot) = usize::try_from(idx.value(r))
                    .ok()
                    .and_then(|i| out.get_mut(i))
                {
                    *slot = spent.value(r);
                }
            }
        }
        Ok(out)
    }
}

/// The model the gateway's rules saw for a request: the one asked for,
/// or the fallback of the limit named in `limit_key`.
pub(crate) fn admitted_model(fallbacks: &[(String, String)]) -> String {
    if fallbacks.is_empty() {
        return "requested_model".into();
    }
    let arms: String = fallbacks
        .iter()
        .map(|(rule, model)| format!(" WHEN {} THEN {}", quote(rule), quote(model)))
        .collect();
    format!(
        "(CASE WHEN fallback_reason IN ('rate_limited', 'budget_exhausted') \
         THEN CASE split_part(limit_key, ':', 1){arms} ELSE requested_model END \
         ELSE requested_model END)"
    )
}

/// ` AND ...` for each filter of `scope`.
pub(crate) fn scope_sql(scope: &RuleScope, model: &str) -> String {
    let mut out = String::new();
    let mut like = |expr: &str, glob: &str| {
        out.push_str(&format!(
            " AND regexp_like({expr}, {})",
            quote(&glob_regex(glob))
        ));
    };
    if let Some(g) = &scope.model {
        like(model, g);
    }
    if let Some(g) = &scope.consumer {
        like("consumer", g);
    }
    if let Some(g) = &scope.team {
        like("team", g);
    }
    if let Some((k, g)) = scope.tag.as_deref().and_then(|t| t.split_once('=')) {
        like(
            &format!("array_element(map_extract(tags, {}), 1)", quote(k.trim())),
            g.trim(),
        );
    }
    if !scope.exempt.is_empty() {
        let names: Vec<String> = scope.exempt.iter().map(|e| quote(e)).collect();
        out.push_str(&format!(
            " AND (consumer IS NULL OR consumer NOT IN ({}))",
            names.join(", ")
        ));
    }
    out
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A glob (`*`, `?`, `[...]`, `[!...]`) as an anchored regular expression.
fn glob_regex(glob: &str) -> String {
    let mut re = String::from("^");
    let mut chars = glob.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            '[' => {
                re.push('[');
                if chars.peek() == Some(&'!') {
                    chars.next();
                    re.push('^');
                }
                for c in chars.by_ref() {
                    if c == ']' {
                        break;
                    }
                    if c == '\\' || c == '[' {
                        re.push('\\');
                    }
                    re.push(c);
                }
                re.push(']');
            }
            c if c.is_ascii_alphanumeric() || !c.is_ascii() => re.push(c),
            c => {
                re.push('\\');
                re.push(c);
            }
        }
    }
    re.push('$');
    re
}

#[async_trait]
impl TableProvider for BudgetsTable {
    fn schema(&self) -> SchemaRef {
        budgets_schema()
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
        let batch = self.batch(state).await?;
        let table = MemTable::try_new(batch.schema(), vec![vec![batch]])?;
        table.scan(state, projection, &[], limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_become_anchored_regular_expressions() {
        let cases = [
            ("deepseek-*", "deepseek-r1", true),
            ("deepseek-*", "xdeepseek-r1", false),
            ("qwq-3?b", "qwq-32b", true),
            ("team.a", "teamxa", false),
            ("[!a]*", "bob", true),
            ("[!a]*", "alice", false),
            ("a+b", "a+b", true),
        ];
        for (glob, value, want) in cases {
            let re = regex::Regex::new(&glob_regex(glob)).unwrap();
            assert_eq!(re.is_match(value), want, "{glob} {value}");
        }
    }

    #[test]
    fn a_consumer_sees_the_rules_that_may_take_its_requests() {
        let budget = |consumer: Option<&str>, team: Option<&str>, exempt: &[&str]| BudgetSpec {
            name: "b".into(),
            scope: RuleScope {
                consumer: consumer.map(str::to_string),
                team: team.map(str::to_string),
                exempt: exempt.iter().map(|s| s.to_string()).collect(),
                ..RuleScope::default()
            },
            usd: Usd::ZERO,
            period: Period::Day,
            timezone: chrono_tz::UTC,
            alert_at: Vec::new(),
            on_exhausted: "block".into(),
            downgrade: None,
        };
        let rules = LimitRules {
            budgets: vec![
                budget(None, None, &[]),
                budget(Some("al*"), None, &[]),
                budget(None, Some("search"), &[]),
                budget(None, None, &["alice"]),
                budget(Some("bob"), None, &[]),
            ],
            ..LimitRules::default()
        };
        let seen = rules.visible_to(Some(("alice", Some("search"))));
        assert_eq!(seen.budgets.len(), 3);
        assert_eq!(rules.visible_to(None).budgets.len(), 5);
    }
}
