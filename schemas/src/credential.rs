//! The one reading of a presented credential, for every surface that takes
//! one: the gateway, the query service's HTTP API and the simulator.
//!
//! A key arrives as `Authorization: Bearer <key>` or as `x-api-key: <key>`.
//! The auth scheme is case-insensitive and may be followed by more than one
//! space (RFC 9110, section 11.1 and 11.4); the key itself is taken as sent,
//! minus surrounding whitespace. When both headers are present,
//! `Authorization` decides: a non-bearer `Authorization` is refused rather
//! than silently ignored in favour of `x-api-key`.

/// Why no key could be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("no API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`")]
    Missing,
    #[error("the Authorization header is not a bearer token: send `Authorization: Bearer <key>`")]
    NotBearer,
    #[error("the API key is empty")]
    Empty,
}

/// The key presented by the raw values of the `Authorization` and
/// `x-api-key` headers (either may be absent), as the bytes sent.
pub fn presented<'a>(
    authorization: Option<&'a [u8]>,
    x_api_key: Option<&'a [u8]>,
) -> Result<&'a [u8], CredentialError> {
    let key = match (authorization, x_api_key) {
        (Some(value), _) => bearer(value)?,
        (None, Some(value)) => value.trim_ascii(),
        (None, None) => return Err(CredentialError::Missing),
    };
    if key.is_empty() {
        return Err(CredentialError::Empty);
    }
    Ok(key)
}

/// The token of an `Authorization: Bearer <token>` value.
fn bearer(value: &[u8]) -> Result<&[u8], CredentialError> {
    const SCHEME: &[u8] = b"bearer";
    let value = value.trim_ascii_start();
    let (scheme, rest) = value.split_at(value.len().min(SCHEME.len()));
    let separated = rest.first().is_some_and(|b| *b == b' ' || *b == b'\t');
    if !scheme.eq_ignore_ascii_case(SCHEME) || !(separated || rest.is_empty()) {
        return Err(CredentialError::NotBearer);
    }
    Ok(rest.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(v: &str) -> Result<&[u8], CredentialError> {
        presented(Some(v.as_bytes()), None)
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case_and_spacing() {
        for value in [
            "Bearer tg-k",
            "bearer tg-k",
            "BEARER tg-k",
            "bEaReR tg-k",
            "Bearer   tg-k  ",
            "Bearer\ttg-k",
            " Bearer tg-k",
        ] {
            assert_eq!(auth(value), Ok(&b"tg-k"[..]), "{value:?}");
        }
    }

    #[test]
    fn other_schemes_and_glued_tokens_are_not_bearer_tokens() {
        for value in [
            "Basic dGc6aw==",
            "tg-k",
            "Bearertg-k",
            "Bear tg-k",
            "Token tg-k",
        ] {
            assert_eq!(auth(value), Err(CredentialError::NotBearer), "{value:?}");
        }
    }

    #[test]
    fn an_empty_key_is_refused_in_either_header() {
        assert_eq!(auth("Bearer"), Err(CredentialError::Empty));
        assert_eq!(auth("Bearer   "), Err(CredentialError::Empty));
        assert_eq!(presented(None, Some(b"  ")), Err(CredentialError::Empty));
        assert_eq!(presented(None, None), Err(CredentialError::Missing));
    }

    #[test]
    fn x_api_key_is_read_when_there_is_no_authorization() {
        assert_eq!(presented(None, Some(b" tg-k ")), Ok(&b"tg-k"[..]));
        assert_eq!(
            presented(Some(b"Bearer a"), Some(b"b")),
            Ok(&b"a"[..]),
            "Authorization decides"
        );
        assert_eq!(
            presented(Some(b"Basic x"), Some(b"b")),
            Err(CredentialError::NotBearer),
            "a wrong Authorization is not papered over"
        );
    }

    #[test]
    fn the_key_is_returned_byte_for_byte() {
        let value = "Bearer ключ-' OR '1'='1".as_bytes();
        assert_eq!(
            presented(Some(value), None),
            Ok("ключ-' OR '1'='1".as_bytes())
        );
    }
}
