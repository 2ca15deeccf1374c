//! Bearer-token authentication: verifying JWTs into a [`Principal`] and minting dev
//! tokens. The accepted algorithms are pinned by configuration (a token naming another
//! algorithm — `none`, or HS256 against an RSA key — is rejected before any key is
//! tried); keys come from an HS256 secret, RS256/ES256 public keys in PEM, or a JWKS
//! document (file, or URL fetched, cached and refreshed, `kid` honoured). `exp` and `nbf`
//! are checked with a small leeway, `iss` and `aud` when configured.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{
    decode, decode_header, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;

pub const SCOPE_READ: &str = "orchestrator:read";
pub const SCOPE_WRITE: &str = "orchestrator:write";
pub const SCOPE_ADMIN: &str = "orchestrator:admin";

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 5;
/// A JWKS URL is fetched again at most this often when an unknown `kid` shows up.
const JWKS_MIN_REFETCH: Duration = Duration::from_secs(10);

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
    #[error("auth configuration: {0}")]
    Config(String),
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

/// A verification key, optionally named by `kid`.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

fn family(a: Algorithm) -> u8 {
    match a {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => 0,
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => 1,
        Algorithm::ES256 | Algorithm::ES384 => 2,
        Algorithm::EdDSA => 3,
    }
}

fn keys_from_jwks(set: &JwkSet, allowed: &[Algorithm]) -> Vec<Key> {
    set.keys
        .iter()
        .filter_map(|jwk| {
            let key = DecodingKey::from_jwk(jwk).ok()?;
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok())
                .or_else(|| allowed.iter().copied().find(|a| family(*a) != 0))?;
            Some(Key {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            })
        })
        .collect()
}

/// Verifies tokens with the configured keys.
#[derive(Clone)]
pub struct Verifier {
    allowed: Vec<Algorithm>,
    keys: Arc<RwLock<Vec<Key>>>,
    issuer: Option<String>,
    audience: Option<String>,
    jwks_url: Option<String>,
    last_fetch: Arc<RwLock<Option<Instant>>>,
    http: reqwest::Client,
}

impl Verifier {
    /// A verifier that only accepts HS256 tokens signed with `secret`.
    pub fn hs256(secret: &str, issuer: Option<&str>, audience: Option<&str>) -> Verifier {
        Verifier {
            allowed: vec![Algorithm::HS256],
            keys: Arc::new(RwLock::new(vec![Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
            }])),
            issuer: issuer.map(str::to_string),
            audience: audience.map(str::to_string),
            jwks_url: None,
            last_fetch: Arc::new(RwLock::new(None)),
            http: reqwest::Client::new(),
        }
    }

    /// Build from configuration. `hs256_secret` is the resolved (possibly generated) one.
    pub fn from_config(c: &AuthConfig, hs256_secret: &str) -> Result<Verifier, Error> {
        let allowed: Vec<Algorithm> = c
            .algorithms
            .iter()
            .map(|a| {
                a.parse::<Algorithm>()
                    .map_err(|_| Error::Config(format!("auth.algorithms: unknown algorithm '{a}'")))
            })
            .collect::<Result<_, _>>()?;
        if allowed.is_empty() {
            return Err(Error::Config(
                "auth.algorithms must name at least one algorithm".into(),
            ));
        }
        let mut keys = Vec::new();
        if allowed.contains(&Algorithm::HS256) {
            keys.push(Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(hs256_secret.as_bytes()),
            });
        }
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))
        };
        if let Some(p) = &c.rs256_public_key {
            let key = DecodingKey::from_rsa_pem(&read(p)?)
                .map_err(|e| Error::Config(format!("auth.rs256_public_key: {e}")))?;
            keys.push(Key {
                kid: None,
                alg: Algorithm::RS256,
                key,
            });
        }
        if let Some(p) = &c.es256_public_key {
            let key = DecodingKey::from_ec_pem(&read(p)?)
                .map_err(|e| Error::Config(format!("auth.es256_public_key: {e}")))?;
            keys.push(Key {
                kid: None,
                alg: Algorithm::ES256,
                key,
            });
        }
        if let Some(p) = &c.jwks_file {
            let set: JwkSet = serde_json::from_slice(&read(p)?)
                .map_err(|e| Error::Config(format!("auth.jwks_file: {e}")))?;
            keys.extend(keys_from_jwks(&set, &allowed));
        }
        let v = Verifier {
            allowed,
            keys: Arc::new(RwLock::new(keys)),
            issuer: c.issuer.clone(),
            audience: c.audience.clone(),
            jwks_url: c.jwks_url.clone(),
            last_fetch: Arc::new(RwLock::new(None)),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| Error::Config(e.to_string()))?,
        };
        Ok(v)
    }

    /// Fetch the JWKS URL (if configured) and replace the keys it provided.
    pub async fn refresh_jwks(&self) -> Result<(), Error> {
        let Some(url) = &self.jwks_url else {
            return Ok(());
        };
        if let Ok(mut last) = self.last_fetch.write() {
            if last.is_some_and(|t| t.elapsed() < JWKS_MIN_REFETCH) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        let set: JwkSet = self
            .http
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| Error::Config(format!("jwks {url}: {e}")))?
            .json()
            .await
            .map_err(|e| Error::Config(format!("jwks {url}: {e}")))?;
        let fresh = keys_from_jwks(&set, &self.allowed);
        if let Ok(mut keys) = self.keys.write() {
            // JWKS keys carry a kid; keep the configured ones that do not.
            keys.retain(|k| k.kid.is_none());
            keys.extend(fresh);
        }
        Ok(())
    }

    /// Verify an `Authorization` header value.
    pub async fn verify_header(&self, header: Option<&str>) -> Result<Principal, Error> {
        let token = header
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Error::Missing)?;
        match self.verify(token) {
            Err(Error::Invalid(m)) if m.starts_with("unknown kid") && self.jwks_url.is_some() => {
                // A rotated key: fetch the JWKS again (rate-limited) and retry once.
                self.refresh_jwks().await?;
                self.verify(token)
            }
            other => other,
        }
    }

    fn verify(&self, token: &str) -> Result<Principal, Error> {
        let header =
            decode_header(token).map_err(|e| Error::Invalid(format!("malformed token: {e}")))?;
        if !self.allowed.contains(&header.alg) {
            return Err(Error::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let key = {
            let keys = self
                .keys
                .read()
                .map_err(|_| Error::Invalid("key store poisoned".into()))?;
            let found = match &header.kid {
                Some(kid) => keys
                    .iter()
                    .find(|k| k.kid.as_deref() == Some(kid.as_str()) && k.alg == header.alg),
                None => keys.iter().find(|k| k.alg == header.alg),
            };
            match found {
                Some(k) => k.key.clone(),
                None => {
                    return Err(Error::Invalid(match &header.kid {
                        Some(kid) => format!("unknown kid '{kid}'"),
                        None => format!("no key for algorithm {:?}", header.alg),
                    }))
                }
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
        }
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let data = decode::<Claims>(token, &key, &validation)
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
        let p = v.verify(&t).unwrap();
        assert_eq!(p.tenant, "acme");
        assert!(p.require(Access::Read).is_ok());
        assert!(p.require(Access::Write).is_ok());
        assert!(p.require(Access::Admin).is_err());
    }

    #[test]
    fn wrong_key_expired_and_missing_are_rejected() {
        let v = Verifier::hs256("s3cret", None, None);
        let t = mint("other", &req("orchestrator:read", 60), now()).unwrap();
        assert!(v.verify(&t).is_err());
        let t = mint("s3cret", &req("orchestrator:read", 1), now() - 3600).unwrap();
        assert!(v.verify(&t).is_err());

        assert!(v.verify("garbage").is_err());
    }
}
