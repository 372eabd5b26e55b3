//! Who is asking: the admin token sees every row, a consumer's key only
//! that consumer's rows. Keys are compared by their SHA-256, in constant
//! time, as the gateway does.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::QueryError;
use crate::settings::Tenant;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    Admin,
    Consumer(String),
}

impl Principal {
    pub fn name(&self) -> &str {
        match self {
            Principal::Admin => "admin",
            Principal::Consumer(name) => name,
        }
    }
}

/// The admin token and the consumers' key digests.
#[derive(Debug, Clone)]
pub struct Access {
    admin: Option<[u8; 32]>,
    tenants: Vec<Tenant>,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Access {
    pub fn new(admin_token: Option<&str>, tenants: Vec<Tenant>) -> Self {
        Self {
            admin: admin_token.filter(|t| !t.is_empty()).map(digest),
            tenants,
        }
    }

    /// The team of consumer `name`, if it has one.
    pub fn team_of(&self, name: &str) -> Option<&str> {
        self.tenants
            .iter()
            .find(|t| t.name == name)
            .and_then(|t| t.team.as_deref())
    }

    /// The principal a bearer token stands for.
    pub fn bearer(&self, token: &str) -> Result<Principal, QueryError> {
        let d = digest(token);
        if self.admin.is_some_and(|a| bool::from(a.ct_eq(&d))) {
            return Ok(Principal::Admin);
        }
        for t in &self.tenants {
            if t.key_hashes.iter().any(|h| bool::from(h.ct_eq(&d))) {
                return Ok(Principal::Consumer(t.name.clone()));
            }
        }
        Err(QueryError::Unauthenticated(
            "the token is neither the admin token nor a consumer's key".into(),
        ))
    }

    /// A PostgreSQL login: `admin` with the admin token, or a consumer's
    /// name with one of its keys.
    pub fn login(&self, user: &str, password: &str) -> Result<Principal, QueryError> {
        let refused = || {
            QueryError::Unauthenticated(format!("password authentication failed for user {user:?}"))
        };
        match self.bearer(password)? {
            Principal::Admin if user == "admin" => Ok(Principal::Admin),
            Principal::Consumer(name) if name == user => Ok(Principal::Consumer(name)),
            _ => Err(refused()),
        }
    }

    pub fn tenant_names(&self) -> impl Iterator<Item = &str> {
        self.tenants.iter().map(|t| t.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        Access::new(
            Some("root-token"),
            vec![Tenant {
                name: "team-a".into(),
                key_hashes: vec![digest("key-a")],
                team: None,
            }],
        )
    }

    #[test]
    fn tokens_map_to_principals() {
        let a = access();
        assert_eq!(a.bearer("root-token").ok(), Some(Principal::Admin));
        assert_eq!(
            a.bearer("key-a").ok(),
            Some(Principal::Consumer("team-a".into()))
        );
        assert!(a.bearer("nope").is_err());
        assert!(a.bearer("").is_err());
    }

    #[test]
    fn a_login_needs_the_matching_user() {
        let a = access();
        assert!(a.login("admin", "root-token").is_ok());
        assert!(a.login("team-a", "key-a").is_ok());
        assert!(a.login("admin", "key-a").is_err());
        assert!(a.login("team-b", "key-a").is_err());
        assert!(a.login("team-a", "root-token").is_err());
    }

    #[test]
    fn no_admin_token_means_no_admin() {
        let a = Access::new(Some(""), vec![]);
        assert!(a.bearer("").is_err());
    }
}
