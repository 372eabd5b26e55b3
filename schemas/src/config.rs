//! What every part's section of the config file shares. The binary's
//! loader reads the file, interpolates `${ENV}` and hands each part its
//! raw section; the part validates it and, on a bad value, returns an
//! [`Invalid`] naming the key path and where in the file it sits, which
//! the loader turns into a line number. [`Secret`] holds a value that must
//! never reach a log.

use std::ops::Range;

/// A setting a part refused: its key path (`routes[0].fallback[1]`), its
/// byte span in the file when the part knows it, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct Invalid {
    pub path: String,
    pub span: Option<Range<usize>>,
    pub message: String,
}

impl Invalid {
    /// A refused value at `span` (bytes of the file the section came from).
    pub fn at(span: Range<usize>, path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            span: Some(span),
            message: message.into(),
        }
    }

    /// A refused value whose place in the file is not known.
    pub fn key(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            span: None,
            message: message.into(),
        }
    }

    /// The message with the line it points at in `text` (1-based):
    /// `line 6: routes[0].fallback[0]: ...`.
    pub fn located(&self, text: &str) -> String {
        match &self.span {
            Some(span) => format!("line {}: {self}", line_of(text, span.start)),
            None => self.to_string(),
        }
    }
}

/// The 1-based line of byte `offset` in `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = text.floor_char_boundary(offset.min(text.len()));
    text[..end].matches('\n').count() + 1
}

/// A secret from the config (an upstream API key, an admin token). Its
/// `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// `None` for an empty value: an unset `${VAR}` left blank means "no
    /// secret", not an empty one.
    pub fn new(value: String) -> Option<Self> {
        (!value.is_empty()).then_some(Self(value))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_with_a_span_names_its_line() {
        let text = "a = 1\nb = 2\nc = 3\n";
        let e = Invalid::at(8..9, "b", "too big");
        assert_eq!(e.located(text), "line 2: b: too big");
        assert_eq!(Invalid::key("x.y", "bad").located(text), "x.y: bad");
    }

    #[test]
    fn a_secret_is_never_debug_printed_and_empty_is_none() {
        let s = Secret::new("sk-1".into());
        assert_eq!(format!("{s:?}"), "Some(Secret(***))");
        assert!(Secret::new(String::new()).is_none());
    }
}
