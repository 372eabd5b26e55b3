//! The scalar functions the wire's sessions add (`to_json`, `uuid_text`,
//! `version`, `current_setting`): each returns text, so one implementation
//! of DataFusion's function trait serves them all, given a name, a
//! signature and a body.

use arrow::datatypes::DataType;
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};

/// A function's body: its evaluated arguments in, text out.
pub type Body = fn(ScalarFunctionArgs) -> Result<ColumnarValue>;

#[derive(Debug)]
struct TextFunction {
    name: &'static str,
    signature: Signature,
    body: Body,
}

/// A function named `name` that returns text (`Utf8`).
pub fn text(name: &'static str, signature: Signature, body: Body) -> ScalarUDF {
    ScalarUDF::new_from_impl(TextFunction {
        name,
        signature,
        body,
    })
}

// A function is known by its name and signature (comparing bodies, which
// are function pointers, would say nothing).
impl PartialEq for TextFunction {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.signature == other.signature
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
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        (self.body)(args)
    }
}
