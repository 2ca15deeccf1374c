//! Bearer-token authentication: verifying JWTs (algorithm pinned by config, `exp`/`nbf`
//! with a small leeway, optional `iss`/`aud`) into a [`Principal`], scope checks, and
//! minting dev tokens from the HS256 secret.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub const SCOPE_READ: &str = "orchestrator:read";
pub const SCOPE_WRITE: &str = "orchestrator:write";
pub const SCOPE_ADMIN: &str = "orchestrator:admin";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("missing bearer token: send 'Authorization: Bearer <token>'")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token lacks scope '{needed}'")]
    MissingScope { needed: &'static str },
    #[error("cannot mint token: {0}")]
    Mint(String),
}

/// The claims we read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub tenant: String,
    pub scope: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// Who is calling, after verification.
#[derive(Debug, Clone)]
pub struct Principal {
    pub subject: String,
    pub tenant: String,
    scopes: Vec<String>,
}

/// What an endpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Admin,
}

impl Principal {
    /// Admin implies write, write implies read.
    pub fn require(&self, access: Access) -> Result<(), Error> {
        let has = |s: &str| self.scopes.iter().any(|x| x == s);
        let ok = match access {
            Access::Read => has(SCOPE_READ) || has(SCOPE_WRITE) || has(SCOPE_ADMIN),
            Access::Write => has(SCOPE_WRITE) || has(SCOPE_ADMIN),
            Access::Admin => has(SCOPE_ADMIN),
        };
        if ok {
            Ok(())
        } else {
            Err(Error::MissingScope {
                needed: match access {
                    Access::Read => SCOPE_READ,
                    Access::Write => SCOPE_WRITE,
                    Access::Admin => SCOPE_ADMIN,
                },
            })
        }
    }
}

/// Verifies tokens with the configured key.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn hs256(secret: &str, issuer: Option<&str>, audience: Option<&str>) -> Verifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
        }
        match audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Verifier {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// Verify an `Authorization` header value.
    pub fn verify_header(&self, header: Option<&str>) -> Result<Principal, Error> {
        let token = header
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Error::Missing)?;
        let data = decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let c = data.claims;
        if c.tenant.is_empty() {
            return Err(Error::Invalid("empty tenant claim".into()));
        }
        Ok(Principal {
            subject: c.sub,
            tenant: c.tenant,
            scopes: c.scope.split_whitespace().map(str::to_string).collect(),
        })
    }
}

/// What a minted token says.
#[derive(Debug, Clone, Default)]
pub struct TokenRequest<'a> {
    pub tenant: &'a str,
    pub subject: &'a str,
    pub scope: &'a str,
    pub ttl_secs: u64,
    pub issuer: Option<&'a str>,
    pub audience: Option<&'a str>,
}

/// Mint an HS256 token (dev and tests), valid from `now_secs` for `ttl_secs`.
pub fn mint(secret: &str, t: &TokenRequest<'_>, now_secs: u64) -> Result<String, Error> {
    let claims = Claims {
        sub: t.subject.into(),
        tenant: t.tenant.into(),
        scope: t.scope.into(),
        exp: now_secs + t.ttl_secs,
        nbf: None,
        iss: t.issuer.map(str::to_string),
        aud: t.audience.map(str::to_string),
    };
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| Error::Mint(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn req(scope: &str, ttl_secs: u64) -> TokenRequest<'_> {
        TokenRequest {
            tenant: "acme",
            subject: "me",
            scope,
            ttl_secs,
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_and_scopes() {
        let t = mint("s3cret", &req("orchestrator:write", 60), now()).unwrap();
        let v = Verifier::hs256("s3cret", None, None);
        let p = v.verify_header(Some(&format!("Bearer {t}"))).unwrap();
        assert_eq!(p.tenant, "acme");
        assert!(p.require(Access::Read).is_ok());
        assert!(p.require(Access::Write).is_ok());
        assert!(p.require(Access::Admin).is_err());
    }

    #[test]
    fn wrong_key_expired_and_missing_are_rejected() {
        let v = Verifier::hs256("s3cret", None, None);
        let t = mint("other", &req("orchestrator:read", 60), now()).unwrap();
        assert!(v.verify_header(Some(&format!("Bearer {t}"))).is_err());
        let t = mint("s3cret", &req("orchestrator:read", 1), now() - 3600).unwrap();
        assert!(v.verify_header(Some(&format!("Bearer {t}"))).is_err());
        assert!(matches!(v.verify_header(None), Err(Error::Missing)));
        assert!(v.verify_header(Some("Bearer garbage")).is_err());
    }
}
