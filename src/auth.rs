//! Bearer-token authentication: verifying JWTs into a [`Principal`] and minting dev
//! tokens. The accepted algorithms are pinned by configuration (a token naming another
//! algorithm — `none`, or HS256 against an RSA key — is rejected before any key is
//! tried); keys come from an HS256 secret, RS256/ES256 public keys in PEM, or a JWKS
//! document (file, or URL fetched, cached and refreshed, `kid` honoured). `exp` and `nbf`
//! are checked with a small leeway; a configured `iss` or `aud` is a required claim (a
//! token without it is refused), and `aud` may be a string or an array. HS256 secrets are
//! at least [`MIN_HS256_SECRET_BYTES`] long; a JWKS URL is https (plain http only to a
//! loopback address).

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
/// Submitting `shell` tasks: a capability of its own, implied by no other scope.
pub const SCOPE_SHELL: &str = "orchestrator:shell";

/// The shortest HS256 secret accepted (RFC 7518 §3.2: at least the hash size).
pub const MIN_HS256_SECRET_BYTES: usize = 32;

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
    #[error("cluster operations need an orchestrator:admin token of an operator tenant (auth.operator_tenants)")]
    NotOperator,
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
    /// A string or an array of strings (RFC 7519 §4.1.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
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
    /// Defining tasks that run commands on the nodes; only [`SCOPE_SHELL`] grants it.
    Shell,
}

impl Principal {
    /// Whether the token's scopes grant `access`: admin implies write, write implies
    /// read; shell is implied by nothing.
    pub fn allows(&self, access: Access) -> bool {
        let has = |s: &str| self.scopes.iter().any(|x| x == s);
        match access {
            Access::Read => has(SCOPE_READ) || has(SCOPE_WRITE) || has(SCOPE_ADMIN),
            Access::Write => has(SCOPE_WRITE) || has(SCOPE_ADMIN),
            Access::Admin => has(SCOPE_ADMIN),
            Access::Shell => has(SCOPE_SHELL),
        }
    }

    /// `access`, or the scope it needs as the error.
    pub fn require(&self, access: Access) -> Result<(), Error> {
        if self.allows(access) {
            Ok(())
        } else {
            Err(Error::MissingScope {
                needed: match access {
                    Access::Read => SCOPE_READ,
                    Access::Write => SCOPE_WRITE,
                    Access::Admin => SCOPE_ADMIN,
                    Access::Shell => SCOPE_SHELL,
                },
            })
        }
    }

    /// Operators are not tenants: the admin scope in a tenant listed in `operators`.
    pub fn require_operator(&self, operators: &[String]) -> Result<(), Error> {
        self.require(Access::Admin)?;
        if operators.contains(&self.tenant) {
            Ok(())
        } else {
            Err(Error::NotOperator)
        }
    }
}

/// A verification key, optionally named by `kid`.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
    /// From the JWKS URL: replaced by each fetch (the configured keys stay).
    fetched: bool,
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

fn keys_from_jwks(set: &JwkSet, allowed: &[Algorithm], fetched: bool) -> Vec<Key> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve};
    set.keys
        .iter()
        .filter_map(|jwk| {
            // A symmetric key never comes from a JWKS: it would be a secret published.
            if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
                return None;
            }
            let key = DecodingKey::from_jwk(jwk).ok()?;
            // `alg` is optional (RFC 7517): without it, the algorithm the key's type
            // and curve imply, if allowed.
            let implied = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
                AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                    EllipticCurve::P256 => Some(Algorithm::ES256),
                    EllipticCurve::P384 => Some(Algorithm::ES384),
                    _ => None,
                },
                AlgorithmParameters::OctetKeyPair(_) => Some(Algorithm::EdDSA),
                AlgorithmParameters::OctetKey(_) => None,
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok())
                .or(implied)
                .filter(|a| family(*a) != 0 && allowed.contains(a))?;
            Some(Key {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
                fetched,
            })
        })
        .collect()
}

/// The most a JWKS answer may be (a key set is a few kilobytes).
pub const JWKS_MAX_BYTES: usize = 1 << 20;

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
                fetched: false,
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
        if allowed.contains(&Algorithm::HS256) && hs256_secret.len() < MIN_HS256_SECRET_BYTES {
            return Err(Error::Config(format!(
                "auth.hs256_secret is {} bytes; HS256 needs at least {MIN_HS256_SECRET_BYTES} \
                 (e.g. `head -c 32 /dev/urandom | xxd -p -c 64`), or leave it unset for a \
                 generated one",
                hs256_secret.len()
            )));
        }
        if let Some(url) = &c.jwks_url {
            check_jwks_url(url)?;
        }
        // A public key or an identity provider's JWKS verifies tokens minted for every
        // service that trusts that provider: without an audience, a token for any of
        // them would be accepted here.
        let asymmetric = allowed.iter().any(|a| family(*a) != 0)
            || c.rs256_public_key.is_some()
            || c.es256_public_key.is_some()
            || c.jwks_file.is_some()
            || c.jwks_url.is_some();
        if asymmetric && c.audience.as_deref().is_none_or(|a| a.trim().is_empty()) {
            return Err(Error::Config(
                "auth.audience is required with public keys or a JWKS (auth.algorithms other \
                 than HS256, rs256_public_key, es256_public_key, jwks_file, jwks_url): \
                 without it a token the identity provider issued for another service is \
                 accepted here"
                    .into(),
            ));
        }
        if allowed.contains(&Algorithm::HS256) {
            keys.push(Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(hs256_secret.as_bytes()),
                fetched: false,
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
                fetched: false,
            });
        }
        if let Some(p) = &c.es256_public_key {
            let key = DecodingKey::from_ec_pem(&read(p)?)
                .map_err(|e| Error::Config(format!("auth.es256_public_key: {e}")))?;
            keys.push(Key {
                kid: None,
                alg: Algorithm::ES256,
                key,
                fetched: false,
            });
        }
        if let Some(p) = &c.jwks_file {
            let set: JwkSet = serde_json::from_slice(&read(p)?)
                .map_err(|e| Error::Config(format!("auth.jwks_file: {e}")))?;
            keys.extend(keys_from_jwks(&set, &allowed, false));
        }
        let v = Verifier {
            allowed,
            keys: Arc::new(RwLock::new(keys)),
            issuer: c.issuer.clone(),
            audience: c.audience.clone(),
            jwks_url: c.jwks_url.clone(),
            last_fetch: Arc::new(RwLock::new(None)),
            // No redirects: the https-or-loopback check holds for the configured URL
            // only, and a redirect could hand the keys to anyone on the way.
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
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
        let fail = |e: String| Error::Config(format!("jwks {url}: {e}"));
        let mut resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !resp.status().is_success() {
            // A redirect too: it is not followed.
            return Err(fail(format!("answered {}", resp.status())));
        }
        // Read at most JWKS_MAX_BYTES: a key set is a few kilobytes, and an endpoint
        // that sends more must not cost the node its memory.
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| fail(e.to_string()))? {
            if body.len() + chunk.len() > JWKS_MAX_BYTES {
                return Err(fail(format!("answer larger than {JWKS_MAX_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| fail(e.to_string()))?;
        let fresh = keys_from_jwks(&set, &self.allowed, true);
        if let Ok(mut keys) = self.keys.write() {
            // The fetch replaces what the last one gave, kid or not (a key the identity
            // provider dropped is revoked); the configured keys stay.
            keys.retain(|k| !k.fetched);
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
                // A rotated key: fetch the JWKS again (rate-limited) and retry once. The
                // caller is not authenticated yet: why the fetch failed goes to the log only.
                if let Err(error) = self.refresh_jwks().await {
                    tracing::warn!(%error, "JWKS refresh for an unknown kid failed");
                    return Err(Error::Invalid(m));
                }
                self.verify(token)
            }
            other => other,
        }
    }

    fn verify(&self, token: &str) -> Result<Principal, Error> {
        let header =
            decode_header(token).map_err(|e| Error::Invalid(format!("malformed token: {e}")))?;
        if names_critical_extensions(token) {
            // RFC 7515 4.1.11: a token whose header lists extensions the recipient must
            // understand is refused by one that understands none.
            return Err(Error::Invalid(
                "the token's header lists critical extensions (crit), which this server \
                 does not support, or is not strict JSON"
                    .into(),
            ));
        }
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
        let mut required = vec!["exp"];
        if self.issuer.is_some() {
            required.push("iss");
        }
        if self.audience.is_some() {
            required.push("aud");
        }
        validation.set_required_spec_claims(required.as_slice());
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
        // Keys of the replicated tables join their parts with NUL: a tenant holding one (or
        // any control character) could read as another tenant's prefix.
        if c.tenant.chars().any(char::is_control) {
            return Err(Error::Invalid(
                "tenant claim holds a control character".into(),
            ));
        }
        Ok(Principal {
            subject: c.sub,
            tenant: c.tenant,
            scopes: c.scope.split_whitespace().map(str::to_string).collect(),
        })
    }
}

/// A JWKS URL must be https, or http to a loopback address (a local test server).
fn check_jwks_url(url: &str) -> Result<(), Error> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| Error::Config(format!("auth.jwks_url '{url}' is not a URL: {e}")))?;
    let host = parsed
        .host_str()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        other => Err(Error::Config(format!(
            "auth.jwks_url must be https (plain http only to a loopback address), not {other}://"
        ))),
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
        aud: t.audience.map(|a| serde_json::Value::String(a.to_string())),
    };
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| Error::Mint(e.to_string()))
}

/// Whether a token's header has a `crit` parameter (jsonwebtoken's header type drops
/// it), or cannot be read strictly enough to tell: fails closed. (jsonwebtoken skips
/// unknown fields more loosely than a parse into values: a number out of range, a lone
/// surrogate or deep nesting in another field would otherwise hide a `crit`.)
fn names_critical_extensions(token: &str) -> bool {
    use base64::Engine;
    let Some(header) = token.split('.').next() else {
        return true;
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()
        .and_then(|bytes| {
            serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&bytes).ok()
        })
        .is_none_or(|h| h.contains_key("crit"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jwk_without_alg_gets_the_algorithm_its_key_type_implies_and_no_symmetric_key_is_taken() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwks.json");
        let mut set: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).expect("the fixture")).expect("JSON");
        let rsa = set["keys"][0].as_object_mut().expect("a key");
        rsa.remove("alg");
        set["keys"]
            .as_array_mut()
            .expect("keys")
            .push(serde_json::json!({"kty": "oct", "kid": "shared", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTAx"}));
        let set: JwkSet = serde_json::from_value(set).expect("a JWKS");
        let algs = |allowed: &[Algorithm]| -> Vec<(Option<String>, Algorithm)> {
            keys_from_jwks(&set, allowed, true)
                .into_iter()
                .map(|k| (k.kid, k.alg))
                .collect()
        };
        // The RSA key is RS256 when that is allowed, and no key otherwise (it was bound
        // to the first allowed algorithm, ES256, whatever its type); the symmetric key
        // never.
        assert_eq!(
            algs(&[Algorithm::ES256, Algorithm::RS256, Algorithm::HS256]),
            [(Some("test-rs-1".into()), Algorithm::RS256)]
        );
        assert!(algs(&[Algorithm::ES256, Algorithm::HS256]).is_empty());
    }

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
        assert!(p.require(Access::Shell).is_err());
        let admin = mint(
            "s3cret",
            &req("orchestrator:write orchestrator:admin", 60),
            now(),
        )
        .unwrap();
        let admin = v.verify(&admin).unwrap();
        assert!(
            admin.require(Access::Shell).is_err(),
            "admin does not imply shell"
        );
        let shell = mint("s3cret", &req("orchestrator:shell", 60), now()).unwrap();
        assert!(v.verify(&shell).unwrap().require(Access::Shell).is_ok());
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

    #[test]
    fn tenant_claims_with_control_characters_are_rejected() {
        let v = Verifier::hs256(SECRET, None, None);
        for tenant in ["acme\u{0}beta", "acme\n", "\u{7f}"] {
            let t = sign(serde_json::json!({"sub": "u", "tenant": tenant,
                "scope": "orchestrator:read", "exp": now() + 60}));
            let err = v.verify(&t).expect_err(tenant);
            assert!(err.to_string().contains("control character"), "{err}");
        }
        let ok = sign(serde_json::json!({"sub": "u", "tenant": "acme-é.1",
            "scope": "orchestrator:read", "exp": now() + 60}));
        assert_eq!(v.verify(&ok).unwrap().tenant, "acme-é.1");
    }

    const SECRET: &str = "a-test-secret-of-at-least-32-bytes";

    fn sign(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn configured_iss_and_aud_are_required_and_aud_may_be_an_array() {
        let v = Verifier::hs256(SECRET, Some("https://iss"), Some("orch"));
        let base = serde_json::json!({"sub": "u", "tenant": "acme", "scope": "orchestrator:read", "exp": now() + 60});
        let with = |extra: serde_json::Value| {
            let mut c = base.clone();
            for (k, x) in extra.as_object().unwrap() {
                c[k] = x.clone();
            }
            sign(c)
        };
        assert!(v.verify(&sign(base.clone())).is_err(), "neither claim");
        assert!(
            v.verify(&with(serde_json::json!({"iss": "https://iss"})))
                .is_err(),
            "no aud"
        );
        assert!(
            v.verify(&with(serde_json::json!({"aud": "orch"}))).is_err(),
            "no iss"
        );
        assert!(v
            .verify(&with(
                serde_json::json!({"iss": "https://iss", "aud": "orch"})
            ))
            .is_ok());
        assert!(v
            .verify(&with(
                serde_json::json!({"iss": "https://iss", "aud": ["x", "orch"]})
            ))
            .is_ok());
        assert!(v
            .verify(&with(
                serde_json::json!({"iss": "https://iss", "aud": ["x"]})
            ))
            .is_err());
    }

    #[test]
    fn short_hs256_secrets_and_plain_http_jwks_are_refused_at_start() {
        let c = AuthConfig::default();
        let err = Verifier::from_config(&c, "short")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("at least 32"), "{err}");
        assert!(Verifier::from_config(&c, SECRET).is_ok());
        let remote = AuthConfig {
            algorithms: vec!["RS256".into()],
            jwks_url: Some("http://idp.example.com/jwks.json".into()),
            audience: Some("orchestrator".into()),
            ..AuthConfig::default()
        };
        let err = Verifier::from_config(&remote, "")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("https"), "{err}");
        for ok in [
            "https://idp.example.com/jwks.json",
            "http://127.0.0.1:9/j",
            "http://[::1]:9/j",
        ] {
            let c = AuthConfig {
                jwks_url: Some(ok.into()),
                ..remote.clone()
            };
            assert!(Verifier::from_config(&c, "").is_ok(), "{ok}");
        }
    }

    #[test]
    fn public_keys_and_jwks_need_an_audience() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let setups = [
            AuthConfig {
                algorithms: vec!["RS256".into()],
                jwks_url: Some("https://idp.example.com/jwks.json".into()),
                ..AuthConfig::default()
            },
            AuthConfig {
                algorithms: vec!["RS256".into()],
                rs256_public_key: Some(fixtures.join("rs256_public.pem")),
                ..AuthConfig::default()
            },
            AuthConfig {
                algorithms: vec!["ES256".into()],
                es256_public_key: Some(fixtures.join("es256_public.pem")),
                ..AuthConfig::default()
            },
            AuthConfig {
                jwks_file: Some(fixtures.join("jwks.json")),
                ..AuthConfig::default()
            },
        ];
        for c in setups {
            let err = Verifier::from_config(&c, SECRET)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("auth.audience is required"), "{c:?}: {err}");
            let with = AuthConfig {
                audience: Some("orchestrator".into()),
                ..c.clone()
            };
            assert!(Verifier::from_config(&with, SECRET).is_ok(), "{with:?}");
        }
        // HS256 alone (a secret only this cluster holds) may go without.
        assert!(Verifier::from_config(&AuthConfig::default(), SECRET).is_ok());
    }
}
