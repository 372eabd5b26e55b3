//! `usage` as one consumer sees it: the lake with only that consumer's rows,
//! filtered before anything of the query's own is evaluated. A view would
//! not do: the optimizer merges a view's filter with the query's and may
//! evaluate the query's first, so a predicate that fails on some rows
//! (`1/(CASE WHEN consumer = 'other' THEN 0 ELSE 1 END)`, a cast of
//! another consumer's values) would tell, through its error, what those rows
//! hold. So the table takes only predicates that cannot fail (comparisons,
//! `IN`, `BETWEEN`, `IS NULL`, `LIKE` of columns and literals) for file and
//! partition pruning, and hands back its rows already filtered; every other
//! predicate runs above, on the consumer's rows alone.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::DFSchema;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::DataFusionError;
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{
    BinaryExpr, Expr, Operator, TableProviderFilterPushDown, TableType, col, lit,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::filter::FilterExecBuilder;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};

/// The lake's `usage`, holding only `consumer`'s rows.
#[derive(Debug)]
pub struct TenantTable {
    lake: Arc<dyn TableProvider>,
    consumer: String,
}

impl TenantTable {
    pub fn new(lake: Arc<dyn TableProvider>, consumer: &str) -> Self {
        Self {
            lake,
            consumer: consumer.to_string(),
        }
    }
}

/// Whether evaluating `e` on any row can raise an error (and so say
/// something about that row). Only columns, literals and the operators that
/// compare them are known not to.
fn cannot_fail(e: &Expr) -> bool {
    match e {
        Expr::Column(_) | Expr::Literal(..) => true,
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            matches!(
                op,
                Operator::Eq
                    | Operator::NotEq
                    | Operator::Lt
                    | Operator::LtEq
                    | Operator::Gt
                    | Operator::GtEq
                    | Operator::And
                    | Operator::Or
                    | Operator::IsDistinctFrom
                    | Operator::IsNotDistinctFrom
            ) && cannot_fail(left)
                && cannot_fail(right)
        }
        Expr::Not(inner) | Expr::IsNull(inner) | Expr::IsNotNull(inner) => cannot_fail(inner),
        Expr::Between(b) => cannot_fail(&b.expr) && cannot_fail(&b.low) && cannot_fail(&b.high),
        Expr::InList(l) => cannot_fail(&l.expr) && l.list.iter().all(cannot_fail),
        Expr::Like(l) => {
            l.escape_char.is_none()
                && matches!(*l.pattern, Expr::Literal(..))
                && cannot_fail(&l.expr)
        }
        _ => false,
    }
}

#[async_trait]
impl TableProvider for TenantTable {
    fn schema(&self) -> SchemaRef {
        self.lake.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| match cannot_fail(f) {
                // Used to prune files; still applied above, exactly.
                true => TableProviderFilterPushDown::Inexact,
                false => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        // A limit cannot be applied before the consumer filter.
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let schema = self.lake.schema();
        let consumer = schema.index_of("consumer")?;
        // The scan reads what was asked for plus `consumer`, last when it
        // was not asked for, so the filter can see it.
        let wanted: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..schema.fields().len()).collect(),
        };
        let mut read = wanted.clone();
        if !read.contains(&consumer) {
            read.push(consumer);
        }
        let own = col("consumer").eq(lit(self.consumer.clone()));
        let mut pushed = vec![own.clone()];
        pushed.extend(filters.iter().filter(|f| cannot_fail(f)).cloned());
        let scan = self.lake.scan(state, Some(&read), &pushed, None).await?;
        let scanned = DFSchema::try_from(scan.schema().as_ref().clone())?;
        let predicate = state.create_physical_expr(own, &scanned)?;
        let keep: Vec<usize> = (0..wanted.len()).collect();
        let filter = FilterExecBuilder::new(predicate, scan)
            .apply_projection(Some(keep))?
            .build()?;
        Ok(Arc::new(Barrier::new(Arc::new(filter))))
    }
}

/// Passes its child's rows through unchanged, and no filter down to it: the
/// physical optimizer would otherwise merge a query's filter into the
/// consumer filter below, which evaluates both on every row.
#[derive(Debug)]
struct Barrier {
    input: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
}

impl Barrier {
    fn new(input: Arc<dyn ExecutionPlan>) -> Self {
        let properties = Arc::clone(input.properties());
        Self { input, properties }
    }
}

impl DisplayAs for Barrier {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "TenantBarrier")
    }
}

impl ExecutionPlan for Barrier {
    fn name(&self) -> &str {
        "TenantBarrier"
    }
    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }
    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }
    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }
    fn apply_expressions(
        &self,
        _: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }
    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match <[_; 1]>::try_from(children) {
            Ok([input]) => Ok(Arc::new(Barrier::new(input))),
            Err(_) => Err(DataFusionError::Internal(
                "TenantBarrier takes one child".into(),
            )),
        }
    }
    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        self.input.execute(partition, context)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    async fn ctx() -> SessionContext {
        let batch = RecordBatch::try_from_iter(vec![
            (
                "consumer",
                Arc::new(StringArray::from(vec!["mine", "other", "mine"])) as ArrayRef,
            ),
            (
                "secret",
                Arc::new(StringArray::from(vec!["a", "hidden value", "b"])) as ArrayRef,
            ),
            ("n", Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef),
        ])
        .unwrap();
        let lake = MemTable::try_new(batch.schema(), vec![vec![batch]]).unwrap();
        let ctx = SessionContext::new();
        ctx.register_table("usage", Arc::new(TenantTable::new(Arc::new(lake), "mine")))
            .unwrap();
        ctx
    }

    async fn run(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
        ctx.sql(sql).await?.collect().await
    }

    #[tokio::test]
    async fn a_consumer_sees_only_its_rows_whatever_it_selects() {
        let ctx = ctx().await;
        let rows = |b: &[RecordBatch]| b.iter().map(RecordBatch::num_rows).sum::<usize>();
        assert_eq!(rows(&run(&ctx, "SELECT * FROM usage").await.unwrap()), 2);
        assert_eq!(
            rows(&run(&ctx, "SELECT n FROM usage WHERE n > 0").await.unwrap()),
            2
        );
        let count = run(&ctx, "SELECT count(*) AS c FROM usage").await.unwrap();
        let c = count[0]
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(c.value(0), 2);
    }

    #[tokio::test]
    async fn a_failing_predicate_never_runs_on_another_consumers_rows() {
        let ctx = ctx().await;
        for sql in [
            "SELECT count(*) FROM usage WHERE 1 / (CASE WHEN consumer = 'other' THEN 0 ELSE 1 END) = 1",
            "SELECT count(*) FROM usage WHERE CAST(CASE WHEN consumer <> 'mine' THEN secret END AS INT) = 1",
            "SELECT count(*) FROM (SELECT * FROM usage) u WHERE CAST(CASE WHEN consumer <> 'mine' THEN secret END AS INT) = 1",
        ] {
            let out = run(&ctx, sql).await;
            assert!(out.is_ok(), "{sql}: {out:?}");
        }
    }
}
