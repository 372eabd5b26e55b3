//! Read-only, checked twice: on the parsed statement (for a clear message
//! naming what was refused) and on the plan with DataFusion's `SQLOptions`
//! set to refuse DDL, DML, COPY and SET (they default to allowing all).

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::execution::context::SQLOptions;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;

use crate::QueryError;

/// What a client sent, once it passed the statement check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    Query,
    Explain { analyze: bool },
}

fn refused(what: &str) -> QueryError {
    QueryError::ReadOnly(format!(
        "{what} is refused: the ledger is read-only and answers queries only"
    ))
}

/// The one statement of an HTTP request, parsed with PostgreSQL's dialect.
pub fn parse_one(sql: &str) -> Result<DfStatement, QueryError> {
    let mut statements = DFParser::parse_sql_with_dialect(sql, &PostgreSqlDialect {})
        .map_err(|e| QueryError::Sql(e.to_string()))?;
    match statements.len() {
        0 => Err(QueryError::BadRequest("the query is empty".into())),
        1 => statements
            .pop_front()
            .ok_or_else(|| QueryError::BadRequest("the query is empty".into())),
        n => Err(refused(&format!(
            "a request with {n} statements (send one statement per request)"
        ))),
    }
}

/// Allows queries and EXPLAIN of queries; names anything else.
pub fn check(statement: &DfStatement) -> Result<Allowed, QueryError> {
    match statement {
        DfStatement::Statement(s) => check_sql(s),
        DfStatement::Explain(e) => match check(&e.statement)? {
            Allowed::Query => Ok(Allowed::Explain {
                analyze: e.options.analyze,
            }),
            Allowed::Explain { .. } => Err(QueryError::Sql("EXPLAIN of an EXPLAIN".into())),
        },
        DfStatement::CreateExternalTable(_) => Err(refused("CREATE EXTERNAL TABLE")),
        DfStatement::CopyTo(_) => Err(refused("COPY")),
        DfStatement::Reset(_) => Err(refused("RESET")),
    }
}

/// The same rule for a statement that arrived over the PostgreSQL wire.
pub fn check_sql(s: &Statement) -> Result<Allowed, QueryError> {
    match s {
        Statement::Query(_) => Ok(Allowed::Query),
        Statement::Explain {
            statement, analyze, ..
        } => match check_sql(statement)? {
            Allowed::Query => Ok(Allowed::Explain { analyze: *analyze }),
            Allowed::Explain { .. } => Err(QueryError::Sql("EXPLAIN of an EXPLAIN".into())),
        },
        other => Err(refused(&kind(other))),
    }
}

/// A statement's kind as its leading keywords, e.g. `DROP TABLE`.
pub fn kind(s: &Statement) -> String {
    let text = s.to_string();
    let words: Vec<&str> = text.split_whitespace().take(3).collect();
    let n = match words.first().map(|w| w.to_ascii_uppercase()).as_deref() {
        Some("CREATE" | "DROP" | "ALTER" | "SHOW" | "TRUNCATE") => 2,
        Some("INSERT" | "DELETE") => 2,
        _ => 1,
    };
    words[..n.min(words.len())].join(" ").to_ascii_uppercase()
}

/// The plan check: no DDL, DML, COPY or statements anywhere in the tree,
/// subqueries included.
pub fn verify(plan: &LogicalPlan) -> Result<(), QueryError> {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(plan)
        .map_err(|e| refused(&format!("this plan ({})", e.strip_backtrace())))?;
    let mut bad = None;
    let _ = plan.apply_with_subqueries(|node| {
        if matches!(
            node,
            LogicalPlan::Ddl(_)
                | LogicalPlan::Dml(_)
                | LogicalPlan::Copy(_)
                | LogicalPlan::Statement(_)
        ) {
            bad = Some(node.display().to_string());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    match bad {
        Some(node) => Err(refused(&node)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(sql: &str) -> Result<Allowed, QueryError> {
        check(&parse_one(sql)?)
    }

    #[test]
    fn queries_pass() {
        for sql in [
            "SELECT 1",
            "with a as (select 1 x) select * from a union all select 2",
            "SELECT * FROM usage WHERE consumer = 'x' ORDER BY ts_start LIMIT 5",
        ] {
            assert_eq!(verdict(sql).ok(), Some(Allowed::Query), "{sql}");
        }
        assert_eq!(
            verdict("EXPLAIN ANALYZE SELECT 1").ok(),
            Some(Allowed::Explain { analyze: true })
        );
    }

    #[test]
    fn everything_else_is_refused_by_name() {
        for (sql, name) in [
            ("DROP TABLE usage", "DROP TABLE"),
            ("CREATE TABLE t AS SELECT 1", "CREATE TABLE"),
            ("CREATE VIEW v AS SELECT 1", "CREATE VIEW"),
            (
                "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
                "CREATE EXTERNAL TABLE",
            ),
            ("INSERT INTO usage SELECT * FROM usage", "INSERT INTO"),
            ("DELETE FROM usage", "DELETE FROM"),
            ("UPDATE usage SET status = 1", "UPDATE"),
            ("COPY usage TO '/tmp/x.csv'", "COPY"),
            ("SET datafusion.execution.batch_size = 1", "SET"),
            ("EXPLAIN DROP TABLE usage", "DROP TABLE"),
            ("SELECT 1; DROP TABLE usage", "2 statements"),
        ] {
            match verdict(sql) {
                Err(QueryError::ReadOnly(m)) => assert!(m.contains(name), "{sql}: {m}"),
                other => panic!("{sql}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_sql_is_an_error_not_a_panic() {
        for sql in ["", "SELEC 1", "SELECT (", "\u{0}", "'unterminated"] {
            assert!(verdict(sql).is_err(), "{sql:?}");
        }
    }
}
