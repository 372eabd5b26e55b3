//! `information_schema` as PostgreSQL clients read it. DataFusion's own
//! describes columns in Arrow's words (`Utf8View`, `Timestamp(µs, "UTC")`),
//! numbers them from 0 and has no `udt_name`, so a BI tool's schema browser
//! (Grafana's reads `data_type`, `udt_name`, `numeric_precision`,
//! `numeric_scale`) sees every column as unknown text. On the PostgreSQL
//! surface `columns` is therefore PostgreSQL's: the type each column goes
//! over the wire as, in the names of PostgreSQL's `information_schema`
//! (<https://www.postgresql.org/docs/16/infoschema-columns.html>), numbered
//! from 1. The other views are DataFusion's.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Builder, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::information_schema::InformationSchemaProvider;
use datafusion::catalog::{CatalogProviderList, SchemaProvider, Session, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_postgres::arrow_pg::datatypes::field_into_pg_type;
use datafusion_postgres::pgwire::api::Type;

/// The schema's name, as PostgreSQL spells it.
pub const NAME: &str = "information_schema";

/// DataFusion's `information_schema` with PostgreSQL's `columns`.
#[derive(Debug)]
pub struct PgInformationSchema {
    inner: InformationSchemaProvider,
    catalogs: Arc<dyn CatalogProviderList>,
}

impl PgInformationSchema {
    pub fn new(catalogs: Arc<dyn CatalogProviderList>) -> Self {
        Self {
            inner: InformationSchemaProvider::new(catalogs.clone()),
            catalogs,
        }
    }
}

#[async_trait]
impl SchemaProvider for PgInformationSchema {
    fn table_names(&self) -> Vec<String> {
        self.inner.table_names()
    }
    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        if name.eq_ignore_ascii_case("columns") {
            return Ok(Some(Arc::new(Columns {
                catalogs: self.catalogs.clone(),
            })));
        }
        self.inner.table(name).await
    }
    fn table_exist(&self, name: &str) -> bool {
        self.inner.table_exist(name)
    }
}

/// `information_schema.columns`, built from the catalogs at each scan.
#[derive(Debug)]
struct Columns {
    catalogs: Arc<dyn CatalogProviderList>,
}

fn columns_schema() -> SchemaRef {
    let text = |name: &str, nullable| Field::new(name, DataType::Utf8, nullable);
    let int = |name: &str| Field::new(name, DataType::Int32, true);
    Arc::new(Schema::new(vec![
        text("table_catalog", false),
        text("table_schema", false),
        text("table_name", false),
        text("column_name", false),
        Field::new("ordinal_position", DataType::Int32, false),
        text("column_default", true),
        text("is_nullable", false),
        text("data_type", false),
        int("character_maximum_length"),
        int("character_octet_length"),
        int("numeric_precision"),
        int("numeric_precision_radix"),
        int("numeric_scale"),
        int("datetime_precision"),
        text("interval_type", true),
        text("udt_catalog", false),
        text("udt_schema", false),
        text("udt_name", false),
        text("is_identity", false),
        text("is_generated", false),
        text("is_updatable", false),
    ]))
}

/// How PostgreSQL's `information_schema` describes one column type:
/// `data_type` (the SQL name, `ARRAY` for arrays), numeric precision,
/// radix and scale, and datetime precision.
struct Described {
    data_type: &'static str,
    numeric: Option<(i32, i32, i32)>,
    datetime_precision: Option<i32>,
}

fn describe(pg: &Type, arrow: &DataType) -> Described {
    let (data_type, numeric, datetime_precision) = match *pg {
        Type::BOOL => ("boolean", None, None),
        Type::INT2 => ("smallint", Some((16, 2, 0)), None),
        Type::INT4 => ("integer", Some((32, 2, 0)), None),
        Type::INT8 => ("bigint", Some((64, 2, 0)), None),
        Type::FLOAT4 => ("real", Some((24, 2, 0)), None),
        Type::FLOAT8 => ("double precision", Some((53, 2, 0)), None),
        Type::NUMERIC => {
            let numeric = match arrow {
                DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => {
                    Some((i32::from(*p), 10, i32::from(*s)))
                }
                _ => None,
            };
            ("numeric", numeric, None)
        }
        Type::TEXT => ("text", None, None),
        Type::VARCHAR => ("character varying", None, None),
        Type::CHAR => ("\"char\"", None, None),
        Type::BYTEA => ("bytea", None, None),
        Type::DATE => ("date", None, Some(0)),
        Type::TIME => ("time without time zone", None, Some(6)),
        Type::TIMESTAMP => ("timestamp without time zone", None, Some(6)),
        Type::TIMESTAMPTZ => ("timestamp with time zone", None, Some(6)),
        Type::INTERVAL => ("interval", None, Some(6)),
        Type::UUID => ("uuid", None, None),
        Type::JSON => ("json", None, None),
        Type::JSONB => ("jsonb", None, None),
        Type::OID => ("oid", None, None),
        // Array types are named for their element with a leading `_`.
        _ if pg.name().starts_with('_') => ("ARRAY", None, None),
        _ => ("USER-DEFINED", None, None),
    };
    Described {
        data_type,
        numeric,
        datetime_precision,
    }
}

impl Columns {
    async fn batch(&self) -> Result<RecordBatch> {
        let schema = columns_schema();
        let n = schema.fields().len();
        let mut text: Vec<StringBuilder> = (0..n).map(|_| StringBuilder::new()).collect();
        let mut ints: Vec<Int32Builder> = (0..n).map(|_| Int32Builder::new()).collect();
        for catalog_name in self.catalogs.catalog_names() {
            let Some(catalog) = self.catalogs.catalog(&catalog_name) else {
                continue;
            };
            let mut schemas = catalog.schema_names();
            schemas.sort();
            for schema_name in schemas {
                if schema_name == NAME {
                    continue;
                }
                let Some(tables) = catalog.schema(&schema_name) else {
                    continue;
                };
                let mut names = tables.table_names();
                names.sort();
                for table_name in names {
                    let Some(table) = tables.table(&table_name).await? else {
                        continue;
                    };
                    for (i, field) in table.schema().fields().iter().enumerate() {
                        let pg = field_into_pg_type(field).unwrap_or(Type::TEXT);
                        let d = describe(&pg, field.data_type());
                        let row_text: [(usize, Option<&str>); 14] = [
                            (0, Some(&catalog_name)),
                            (1, Some(&schema_name)),
                            (2, Some(&table_name)),
                            (3, Some(field.name())),
                            (5, None),
                            (6, Some(if field.is_nullable() { "YES" } else { "NO" })),
                            (7, Some(d.data_type)),
                            (14, None),
                            (15, Some(&catalog_name)),
                            (16, Some("pg_catalog")),
                            (17, Some(pg.name())),
                            (18, Some("NO")),
                            (19, Some("NEVER")),
                            (20, Some("NO")),
                        ];
                        for (col, value) in row_text {
                            text[col].append_option(value);
                        }
                        let (precision, radix, scale) = match d.numeric {
                            Some((p, r, s)) => (Some(p), Some(r), Some(s)),
                            None => (None, None, None),
                        };
                        let row_ints: [(usize, Option<i32>); 7] = [
                            (4, Some(i as i32 + 1)),
                            (8, None),
                            (9, None),
                            (10, precision),
                            (11, radix),
                            (12, scale),
                            (13, d.datetime_precision),
                        ];
                        for (col, value) in row_ints {
                            ints[col].append_option(value);
                        }
                    }
                }
            }
        }
        let columns: Vec<ArrayRef> = schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| -> ArrayRef {
                if f.data_type() == &DataType::Int32 {
                    Arc::new(ints[i].finish())
                } else {
                    Arc::new(text[i].finish())
                }
            })
            .collect();
        Ok(RecordBatch::try_new(schema, columns)?)
    }
}

#[async_trait]
impl TableProvider for Columns {
    fn schema(&self) -> SchemaRef {
        columns_schema()
    }
    fn table_type(&self) -> TableType {
        TableType::View
    }
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let batch = self.batch().await?;
        let table = MemTable::try_new(batch.schema(), vec![vec![batch]])?;
        table.scan(state, projection, filters, limit).await
    }
}
