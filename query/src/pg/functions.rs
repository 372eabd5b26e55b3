//! The scalar functions the wire's sessions add (`to_json`, `uuid_text`,
//! `version`, `current_setting`): each returns text, so one implementation
//! of DataFusion's function trait serves them all, given a name, a
//! signature and a body. Text that is a PostgreSQL `uuid` or `json` value
//! says so on its field ([`PG_TYPE_KEY`]), so the wire sends it as that type.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};
use datafusion_postgres::arrow_pg::datatypes::PG_TYPE_KEY;

/// The PostgreSQL type a text result holds the text form of, as the field
/// metadata value the wire's encoder and `pg_attribute` read (`uuid`,
/// `json`); plain text is untagged.
pub type PgType = Option<&'static str>;

/// A function's body: its evaluated arguments in, text out.
pub type Body = fn(ScalarFunctionArgs) -> Result<ColumnarValue>;

#[derive(Debug)]
struct TextFunction {
    name: &'static str,
    signature: Signature,
    pg_type: PgType,
    body: Body,
}

/// A function named `name` that returns text (`Utf8`).
pub fn text(name: &'static str, signature: Signature, body: Body) -> ScalarUDF {
    typed_text(name, signature, None, body)
}

/// A function named `name` that returns the text form of `pg_type`.
pub fn typed_text(
    name: &'static str,
    signature: Signature,
    pg_type: PgType,
    body: Body,
) -> ScalarUDF {
    ScalarUDF::new_from_impl(TextFunction {
        name,
        signature,
        pg_type,
        body,
    })
}

// A function is known by its name and signature (comparing bodies, which
// are function pointers, would say nothing).
impl PartialEq for TextFunction {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.signature == other.signature
            && self.pg_type == other.pg_type
    }
}

impl Eq for TextFunction {}

impl std::hash::Hash for TextFunction {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.signature.hash(state);
    }
}

impl ScalarUDFImpl for TextFunction {
    fn name(&self) -> &str {
        self.name
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }
    fn return_field_from_args(&self, _: ReturnFieldArgs) -> Result<FieldRef> {
        let field = Field::new(self.name, DataType::Utf8, true);
        Ok(Arc::new(match self.pg_type {
            Some(t) => field.with_metadata(HashMap::from([(PG_TYPE_KEY.into(), t.into())])),
            None => field,
        }))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        (self.body)(args)
    }
}
