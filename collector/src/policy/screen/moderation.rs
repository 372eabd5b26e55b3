//! An external moderation service: an OpenAI-compatible
//! `POST /v1/moderations` upstream (OpenAI's own, or any service speaking
//! its shape), asked once per text batch within a timeout.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};

use crate::config::guard::ModerationConfig;
use crate::upstream::read::read_all;
use crate::upstream::{Endpoint, SendError, Upstream};

/// Longest moderation answer read, bytes.
const MAX_ANSWER_BYTES: usize = 1 << 20;

pub struct Moderation {
    upstream: Arc<Upstream>,
    model: Option<String>,
    timeout: Duration,
    pub fail_open: bool,
}

/// What the service said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Moderated {
    Clean,
    /// Flagged, with the categories it named (OpenAI's names, e.g.
    /// `violence`).
    Flagged(Vec<String>),
    /// No usable answer within the timeout: why.
    Failed(String),
}

impl Moderation {
    pub fn new(upstream: Arc<Upstream>, config: &ModerationConfig) -> Self {
        Self {
            upstream,
            model: config.model.clone(),
            timeout: config.timeout,
            fail_open: config.fail_open,
        }
    }

    /// Asks about `texts` (one `input` array); flagged if any result is.
    pub async fn check(&self, texts: &[&str]) -> Moderated {
        let mut body = json!({ "input": texts });
        if let Some(m) = &self.model {
            body["model"] = Value::String(m.clone());
        }
        let body = Bytes::from(body.to_string());
        let ask = async {
            let resp = self
                .upstream
                .send(Endpoint::Moderations, body, &[])
                .await
                .map_err(|e| match e {
                    SendError::Connect(m) | SendError::Timeout(m) | SendError::Other(m) => m,
                })?;
            let status = resp.status;
            let bytes = read_all(resp.body, MAX_ANSWER_BYTES, self.timeout)
                .await
                .map_err(|_| "the answer broke or was too large".to_string())?;
            if !(200..300).contains(&status) {
                return Err(format!("answered {status}"));
            }
            read(&bytes, texts.len())
        };
        match tokio::time::timeout(self.timeout, ask).await {
            Err(_) => {
                Moderated::Failed(format!("no answer within {} ms", self.timeout.as_millis()))
            }
            Ok(Err(why)) => Moderated::Failed(why),
            Ok(Ok(m)) => m,
        }
    }
}

/// OpenAI's answer: `{"results": [{"flagged": bool, "categories": {..}}]}`,
/// one result per input, in order; anything less is no answer.
fn read(bytes: &[u8], inputs: usize) -> Result<Moderated, String> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|_| "the answer is not JSON")?;
    let Some(results) = doc.get("results").and_then(Value::as_array) else {
        return Err("the answer has no results".into());
    };
    if results.len() != inputs {
        return Err(format!(
            "the answer has {} results for {inputs} inputs",
            results.len()
        ));
    }
    let mut categories = Vec::new();
    let mut flagged = false;
    for r in results {
        match r.get("flagged").and_then(Value::as_bool) {
            Some(true) => flagged = true,
            Some(false) => continue,
            None => return Err("a result has no flagged".into()),
        }
        if let Some(cats) = r.get("categories").and_then(Value::as_object) {
            for (name, on) in cats {
                if on.as_bool() == Some(true) && !categories.contains(name) {
                    categories.push(name.clone());
                }
            }
        }
    }
    Ok(if flagged {
        Moderated::Flagged(categories)
    } else {
        Moderated::Clean
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_in_openai_shape() {
        let flagged = br#"{"results":[{"flagged":false,"categories":{}},{"flagged":true,"categories":{"violence":true,"hate":false}}]}"#;
        assert_eq!(
            read(flagged, 2),
            Ok(Moderated::Flagged(vec!["violence".into()]))
        );
        assert_eq!(
            read(br#"{"results":[{"flagged":false}]}"#, 1),
            Ok(Moderated::Clean)
        );
        assert!(read(b"<html>", 1).is_err());
        assert!(read(br#"{"results":[{}]}"#, 1).is_err());
        assert!(read(br#"{"error":{"message":"x"}}"#, 1).is_err());
        assert!(
            read(br#"{"results":[]}"#, 1).is_err(),
            "no result for the input"
        );
        let one = br#"{"results":[{"flagged":false}]}"#;
        assert!(read(one, 2).is_err(), "one result for two inputs");
    }
}
