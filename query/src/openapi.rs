//! The HTTP API's OpenAPI 3 document, served at `/openapi.json`. A test
//! calls every documented operation and checks the answer's status is one
//! the document lists.

pub const DOCUMENT: &str = include_str!("../openapi.json");
