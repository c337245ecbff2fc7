//! Client authentication: turns an upgrade request's credentials into a
//! [`UserId`], before any upgrade happens.
//!
//! Two modes. With a secret: an HS256 JWT (only HS256; `exp` required, `nbf`
//! honoured, 30 s leeway for clock skew) whose `sub` is the user ID; `?user=`
//! is ignored so a token for user A can never act as user B. Without a
//! secret (dev mode): `?user=` is trusted. Stateless after construction.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use thiserror::Error;

use crate::protocol::UserId;

/// Clock-skew leeway applied to `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 30;

/// Why a client was not let in. `Unauthorized` maps to 401, `BadUser` to 400.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("user IDs are 1-128 bytes of [A-Za-z0-9._:@-]")]
    BadUser,
}

/// The credentials found on an upgrade request.
#[derive(Debug, Default)]
pub struct Credentials<'a> {
    /// `?user=` (dev mode only).
    pub query_user: Option<&'a str>,
    /// `?token=`.
    pub query_token: Option<&'a str>,
    /// `Authorization: Bearer ...` (wins over the query token).
    pub bearer: Option<&'a str>,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
}

/// Mints an HS256 token this broker accepts for `user`, valid for `ttl`
/// (`sub`, `iat`, `exp`), as `switchyard token` prints it.
pub fn mint(
    secret: &[u8],
    user: &UserId,
    ttl: std::time::Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let claims =
        serde_json::json!({"sub": user.as_str(), "iat": now, "exp": now.saturating_add(ttl.as_secs())});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
}

/// Decides who a client is.
#[derive(Clone)]
pub enum Authenticator {
    Dev,
    Jwt { key: DecodingKey, validation: Box<Validation> },
}

impl Authenticator {
    pub fn new(secret: Option<&[u8]>) -> Self {
        match secret {
            None => Authenticator::Dev,
            Some(secret) => {
                let mut validation = Validation::new(Algorithm::HS256);
                validation.leeway = LEEWAY_SECS;
                validation.validate_nbf = true;
                validation.validate_exp = true;
                validation.set_required_spec_claims(&["exp", "sub"]);
                Authenticator::Jwt { key: DecodingKey::from_secret(secret), validation: Box::new(validation) }
            }
        }
    }

    pub fn is_dev(&self) -> bool {
        matches!(self, Authenticator::Dev)
    }

    /// Authenticates a client.
    pub fn authenticate(&self, creds: &Credentials<'_>) -> Result<UserId, AuthError> {
        match self {
            Authenticator::Dev => {
                let user = creds.query_user.ok_or(AuthError::BadUser)?;
                UserId::parse(user).map_err(|_| AuthError::BadUser)
            }
            Authenticator::Jwt { key, validation } => {
                let token = creds.bearer.or(creds.query_token).ok_or(AuthError::Unauthorized(
                    "a token is required (?token= or Authorization: Bearer)",
                ))?;
                let data = jsonwebtoken::decode::<Claims>(token, key, validation)
                    .map_err(|_| AuthError::Unauthorized("invalid or expired token"))?;
                let sub = data.claims.sub.ok_or(AuthError::Unauthorized("the token has no sub claim"))?;
                UserId::parse(&sub)
                    .map_err(|_| AuthError::Unauthorized("the token's sub is not a valid user ID"))
            }
        }
    }
}

/// Compares two secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }

    fn token(claims: serde_json::Value, secret: &[u8]) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[test]
    fn dev_mode_trusts_query_user() {
        let a = Authenticator::new(None);
        let creds = Credentials { query_user: Some("u1"), ..Default::default() };
        assert_eq!(a.authenticate(&creds).unwrap().as_str(), "u1");
        let bad = Credentials { query_user: Some("no spaces"), ..Default::default() };
        assert_eq!(a.authenticate(&bad).unwrap_err(), AuthError::BadUser);
    }

    #[test]
    fn jwt_mode_uses_sub_and_ignores_query_user() {
        let a = Authenticator::new(Some(b"s3cret"));
        let t = token(serde_json::json!({"sub": "alice", "exp": now() + 60}), b"s3cret");
        let creds = Credentials { query_user: Some("mallory"), query_token: Some(&t), ..Default::default() };
        assert_eq!(a.authenticate(&creds).unwrap().as_str(), "alice");
    }

    #[test]
    fn minted_tokens_are_accepted() {
        let a = Authenticator::new(Some(b"s3cret"));
        let user = UserId::parse("carol").unwrap();
        let t = mint(b"s3cret", &user, std::time::Duration::from_secs(60)).unwrap();
        let creds = Credentials { query_token: Some(&t), ..Default::default() };
        assert_eq!(a.authenticate(&creds).unwrap(), user);
        let other = Authenticator::new(Some(b"other"));
        assert!(other.authenticate(&creds).is_err());
    }

    #[test]
    fn jwt_rejections() {
        let a = Authenticator::new(Some(b"s3cret"));
        let expired = token(serde_json::json!({"sub": "a", "exp": now() - 3600}), b"s3cret");
        let wrong_key = token(serde_json::json!({"sub": "a", "exp": now() + 60}), b"other");
        let no_exp = token(serde_json::json!({"sub": "a"}), b"s3cret");
        let no_sub = token(serde_json::json!({"exp": now() + 60}), b"s3cret");
        let bad_sub = token(serde_json::json!({"sub": "a b", "exp": now() + 60}), b"s3cret");
        let future_nbf =
            token(serde_json::json!({"sub": "a", "exp": now() + 7200, "nbf": now() + 3600}), b"s3cret");
        for t in [expired, wrong_key, no_exp, no_sub, bad_sub, future_nbf, "garbage".to_string()] {
            let creds = Credentials { query_token: Some(&t), ..Default::default() };
            assert!(matches!(a.authenticate(&creds), Err(AuthError::Unauthorized(_))), "{t}");
        }
        assert!(a.authenticate(&Credentials::default()).is_err());
    }

    #[test]
    fn header_token_wins() {
        let a = Authenticator::new(Some(b"k"));
        let good = token(serde_json::json!({"sub": "h", "exp": now() + 60}), b"k");
        let creds = Credentials { bearer: Some(&good), query_token: Some("junk"), ..Default::default() };
        assert_eq!(a.authenticate(&creds).unwrap().as_str(), "h");
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
