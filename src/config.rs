//! The one config loader: reads the TOML file, interpolates `${ENV}` in
//! its string values, and hands each part its sections, raw, to validate:
//! the gateway (`[gateway]`, `[upstreams.*]`, `[[routes]]`,
//! `[[consumers]]`: `tollgate_collector::config`), the pipeline
//! (`[pipeline]`: `tollgate_ingest::config`) and the query service
//! (`[query]`: `tollgate_query::settings`, `[alerts]`:
//! `tollgate_query::alerts::config`). No other crate sees the whole
//! file. Errors name the file, the line and the key path.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use tollgate_collector::config::{
    RawBudget, RawCacheSettings, RawConsumer, RawGateway, RawGuard, RawRateLimit, RawRedis,
    RawRoute, RawTelemetry, RawUpstream, Sections,
};
use tollgate_ingest::config::{PipelineConfig, RawPipeline};
use tollgate_query::QueryConfig;
use tollgate_query::alerts::AlertsConfig;
use tollgate_query::alerts::config::RawAlerts;
use tollgate_query::settings::RawQuery;
use tollgate_schemas::config::Invalid;
use toml::Spanned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// The whole file, each part's sections validated by that part.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[gateway]`, `[upstreams.*]`, `[[routes]]`, `[[consumers]]`.
    pub collector: tollgate_collector::Config,
    pub pipeline: PipelineConfig,
    /// `None` when the file has no `[query]` table.
    pub query: Option<QueryConfig>,
    /// `[alerts]`: evaluated by the query service.
    pub alerts: AlertsConfig,
}

/// The file as written: every top-level table, each of a part's raw type.
/// Listed field by field (not flattened) so spans and unknown-key errors
/// survive.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    gateway: RawGateway,
    #[serde(default)]
    pipeline: RawPipeline,
    query: Option<RawQuery>,
    #[serde(default)]
    upstreams: BTreeMap<String, Spanned<RawUpstream>>,
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    consumers: Vec<Spanned<RawConsumer>>,
    #[serde(default)]
    telemetry: RawTelemetry,
    redis: Option<RawRedis>,
    #[serde(default)]
    rate_limits: Vec<Spanned<RawRateLimit>>,
    #[serde(default)]
    budgets: Vec<Spanned<RawBudget>>,
    #[serde(default)]
    guard: Vec<Spanned<RawGuard>>,
    #[serde(default)]
    cache: RawCacheSettings,
    #[serde(default)]
    alerts: RawAlerts,
}

impl Config {
    /// Reads, interpolates and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string(), |name| {
            std::env::var(name).ok()
        })
    }

    /// Parses config text; `env` resolves `${NAME}` references.
    pub fn parse(
        text: &str,
        origin: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            message,
        };
        let text = interpolate(text, &env).map_err(invalid)?;
        let file: File = toml::from_str(&text).map_err(|e| invalid(parse_error(&e, &text)))?;
        let located = |e: Invalid| invalid(e.located(&text));
        let mut collector = tollgate_collector::Config::from_sections(Sections {
            gateway: file.gateway,
            upstreams: file.upstreams,
            routes: file.routes,
            consumers: file.consumers,
            telemetry: file.telemetry,
            redis: file.redis,
            rate_limits: file.rate_limits,
            budgets: file.budgets,
            guard: file.guard,
            cache: file.cache,
        })
        .map_err(located)?;
        let pipeline = PipelineConfig::from_raw(file.pipeline).map_err(located)?;
        let alerts = AlertsConfig::from_raw(file.alerts).map_err(located)?;
        let query = file
            .query
            .map(QueryConfig::from_raw)
            .transpose()
            .map_err(located)?;
        let tokens = [
            (
                "query.admin_token",
                query.as_ref().and_then(|q| q.admin_token.as_ref()),
            ),
            (
                "gateway.admin_token",
                collector.gateway.admin_token.as_ref(),
            ),
        ];
        for (key, token) in tokens {
            let Some(token) = token else { continue };
            let digest = tollgate_collector::proxy::auth::hash_key(token.expose());
            let digest = digest.strip_prefix("sha256:").unwrap_or(&digest);
            let taken = collector
                .consumers
                .iter()
                .any(|c| c.key_hashes.iter().any(|h| hex_of(h) == digest));
            if taken {
                return Err(invalid(format!(
                    "{key}: is also a consumer's API key; the admin token must be a secret of its own"
                )));
            }
        }
        if collector.gateway.admin_token.is_none() {
            collector.gateway.admin_token = query.as_ref().and_then(|q| q.admin_token.clone());
        }
        Ok(Self {
            collector,
            pipeline,
            query,
            alerts,
        })
    }
}

fn hex_of(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A TOML error as `line L, column C: message`, without the source line
/// and without any string value the message quotes: a secret written in
/// the wrong place must not be printed back.
fn parse_error(e: &toml::de::Error, text: &str) -> String {
    let message = redact_strings(e.message());
    match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line = text[..start].matches('\n').count() + 1;
            let column = start - text[..start].rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// `message` with every `string "..."` it quotes replaced by `a string`.
fn redact_strings(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("string \"") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "string \"".len()..];
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        out.push_str("a string");
        match end {
            Some(i) => rest = &after[i + 1..],
            None => {
                rest = "";
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Replaces `${NAME}` in string values with the TOML-escaped value of the
/// variable. Comments are left alone, so a commented-out reference to an
/// unset variable is not an error.
fn interpolate(
    text: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(text.len());
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let code_len = code_part_len(line);
        let (code, comment) = line.split_at(code_len);
        let mut rest = code;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                return Err(format!("line {}: unterminated ${{", n + 1));
            };
            let name = &after[..end];
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("line {}: bad variable name ${{{name}}}", n + 1));
            }
            let value = env(name)
                .ok_or_else(|| format!("line {}: environment variable {name} is not set", n + 1))?;
            for c in value.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    c => out.push(c),
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out.push_str(comment);
    }
    Ok(out)
}

/// Length of `line` before a `#` comment that is outside any string.
fn code_part_len(line: &str) -> usize {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match quote {
            Some('"') if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' => return i,
            None => {}
        }
    }
    line.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_collector::config::UpstreamKind;

    const KEY_HASH: &str =
        "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    fn env(name: &str) -> Option<String> {
        match name {
            "DEEPSEEK_API_KEY" => Some("sk-\"quoted\"\\x".into()),
            _ => None,
        }
    }

    fn example() -> String {
        format!(
            r#"
[gateway]
listen = "127.0.0.1:8080"

[upstreams.deepseek]
kind = "openai"
base_url = "https://api.deepseek.com/v1/"
api_key = "${{DEEPSEEK_API_KEY}}"   # ${{NOT_SET}} in a comment is fine
connect_timeout_ms = 2000
first_byte_timeout_ms = 60000

[upstreams.sim-qwq]
kind = "simulated"
latency_ms = 0
tokens_per_s = 0
output_tokens = 64
error_rate = 0.0
error_status = 503
usage = true

[[routes]]
model = "deepseek-r1"
targets = [{{ upstream = "deepseek", model = "deepseek-reasoner", weight = 1 }}]
fallback = ["qwq-32b"]
fallback_on = ["connect", "timeout", "5xx", "429"]

[[routes]]
model = "qwq-32b"
targets = [{{ upstream = "sim-qwq", model = "qwq-32b" }}]

[[consumers]]
name = "search-app"
team = "search"
api_keys = ["{KEY_HASH}"]
models = ["deepseek-r1", "qwq-*"]
"#
        )
    }

    #[test]
    fn the_documented_example_parses() {
        let c = Config::parse(&example(), "test", env).unwrap().collector;
        assert_eq!(c.gateway.listen.to_string(), "127.0.0.1:8080");
        let UpstreamKind::OpenAi(ds) = &c.upstreams["deepseek"].kind else {
            panic!("deepseek is an openai upstream");
        };
        assert_eq!(ds.base_url, "https://api.deepseek.com/v1");
        assert_eq!(ds.api_key.as_ref().unwrap().expose(), "sk-\"quoted\"\\x");
        assert_eq!(format!("{:?}", ds.api_key), "Some(Secret(***))");
        assert_eq!(c.routes[0].fallback, vec!["qwq-32b"]);
        assert_eq!(
            c.consumers[0].models.as_deref().unwrap(),
            ["deepseek-r1", "qwq-*"]
        );
        assert_eq!(c.upstreams["sim-qwq"].provider, "simulated");
        assert_eq!(c.upstreams["deepseek"].provider, "deepseek");
    }

    fn error_of(text: &str) -> String {
        Config::parse(text, "t.toml", env).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field_and_the_line() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "unknown key",
                "[gateway]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n",
                &["line 3", "lisen"],
            ),
            (
                "missing env",
                "[upstreams.a]\nkind = \"openai\"\nbase_url = \"http://x\"\napi_key = \"${NOPE}\"\n",
                &["line 4", "NOPE"],
            ),
            (
                "unknown upstream",
                "[upstreams.a]\nkind = \"simulated\"\n\n[[routes]]\nmodel = \"m\"\ntargets = [{ upstream = \"b\" }]\n",
                &["line 6", "routes[0].targets[0].upstream", "\"b\""],
            ),
            (
                "bad fallback",
                "[upstreams.a]\nkind = \"simulated\"\n[[routes]]\nmodel = \"m\"\ntargets = [{ upstream = \"a\" }]\nfallback = [\"zz\"]\n",
                &["line 6", "routes[0].fallback[0]", "zz"],
            ),
            (
                "bad listen",
                "[gateway]\nlisten = \"nowhere\"\n",
                &["line 2", "gateway.listen"],
            ),
            (
                "plaintext key",
                "[[consumers]]\nname = \"a\"\napi_keys = [\"tg-secret-plaintext\"]\n",
                &["line 3", "consumers[0].api_keys[0]"],
            ),
            (
                "sim field on openai",
                "[upstreams.a]\nkind = \"openai\"\nbase_url = \"http://x\"\nerror_rate = 0.5\n",
                &["upstreams.a", "simulated"],
            ),
            (
                "bad trigger",
                "[upstreams.a]\nkind = \"simulated\"\n[[routes]]\nmodel = \"m\"\ntargets = [{ upstream = \"a\" }]\nfallback_on = [\"sometimes\"]\n",
                &["line 6", "sometimes"],
            ),
            (
                "bad error rate",
                "[upstreams.a]\nkind = \"simulated\"\nerror_rate = 2.0\n",
                &["upstreams.a", "error_rate"],
            ),
        ];
        for (name, text, needles) in cases {
            let e = error_of(text);
            for n in *needles {
                assert!(e.contains(n), "{name}: {e:?} lacks {n:?}");
            }
        }
        assert!(
            !error_of("[[consumers]]\nname = \"a\"\napi_keys = [\"tg-secret-plaintext\"]\n")
                .contains("tg-secret")
        );
    }

    #[test]
    fn duplicate_keys_and_names_are_refused() {
        let dup_key = format!(
            "[[consumers]]\nname = \"a\"\napi_keys = [\"{KEY_HASH}\"]\n[[consumers]]\nname = \"b\"\napi_keys = [\"{KEY_HASH}\"]\n"
        );
        assert!(error_of(&dup_key).contains("already assigned"));
        let dup_name = "[[consumers]]\nname = \"a\"\napi_keys = []\n[[consumers]]\nname = \"a\"\napi_keys = []\n";
        assert!(error_of(dup_name).contains("defined twice"));
    }

    #[test]
    fn an_empty_file_is_a_valid_gateway_with_nothing_routed() {
        let c = Config::parse("", "t", env).unwrap().collector;
        assert_eq!(c.gateway.listen.port(), 8080);
        assert!(c.routes.is_empty());
    }

    #[test]
    fn the_shipped_examples_are_valid() {
        let env = |name: &str| {
            matches!(name, "DEEPSEEK_API_KEY" | "TOLLGATE_ADMIN_TOKEN")
                .then(|| "sk-test".to_string())
        };
        for (name, text) in [
            ("tollgate.toml", include_str!("../examples/tollgate.toml")),
            ("simulated.toml", include_str!("../examples/simulated.toml")),
        ] {
            let c = Config::parse(text, name, env)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .collector;
            assert!(!c.routes.is_empty() && !c.consumers.is_empty(), "{name}");
        }
    }

    #[test]
    fn the_admin_token_cannot_be_a_consumer_key() {
        // KEY_HASH is the digest of "foo".
        let text = format!(
            "[query]\nadmin_token = \"foo\"\n\n[[consumers]]\nname = \"a\"\napi_keys = [\"{KEY_HASH}\"]\n"
        );
        let e = error_of(&text);
        assert!(e.contains("query.admin_token") && !e.contains("foo"), "{e}");
    }

    #[test]
    fn a_secret_in_the_wrong_place_is_not_printed_back() {
        for text in [
            "[[consumers]]\nname = \"a\"\napi_keys = \"tg-PLAINSECRET\"\n",
            "[upstreams.a]\nkind = \"openai\"\nbase_url = \"http://x\"\napi_key = [\"sk-PLAINSECRET\"]\n",
            "[query]\nadmin_token = \"PLAINSECRET-${X\"\n",
        ] {
            let e = error_of(text);
            assert!(e.contains("line "), "{e}");
            assert!(!e.contains("PLAINSECRET"), "{e}");
        }
    }

    #[test]
    fn comment_detection_respects_strings() {
        assert_eq!(code_part_len("a = \"#x\" # c"), 9);
        assert_eq!(code_part_len("a = '#x'"), 8);
        assert_eq!(code_part_len("a = \"\\\"#\" # c"), 10);
    }
}
