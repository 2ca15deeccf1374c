//! Where `http` tasks and webhooks may connect. A URL's host is resolved once, every
//! address it resolves to is checked, and the request goes to the checked address
//! (reqwest `resolve`), so a second DNS answer cannot swap in another. Loopback,
//! link-local, private, CGNAT, ULA, multicast, unspecified and the cluster's own
//! addresses are refused unless `executor.http_allow` (every tenant) or
//! `executor.tenants.<tenant>.http_allow` (that tenant only) lists them. No proxy variables
//! are honoured and no redirect is followed. Webhook bodies are signed with HMAC-SHA256.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::cidr::{self, Cidr};
use crate::config::Config;

/// The header carrying a webhook's signature: `sha256=<hex of HMAC-SHA256(body)>`.
pub const SIGNATURE_HEADER: &str = "X-Orchestrator-Signature";
/// When the webhook was sent (Unix seconds), covered by [`TIMED_SIGNATURE_HEADER`].
pub const TIMESTAMP_HEADER: &str = "X-Orchestrator-Timestamp";
/// `sha256=<hex of HMAC-SHA256("<timestamp>.<body>")>`: a receiver that checks it and
/// refuses old timestamps (five minutes is customary) cannot be fed a replayed webhook
/// beyond that window; within it, the body's `run_id` and `event` deduplicate.
pub const TIMED_SIGNATURE_HEADER: &str = "X-Orchestrator-Signature-Timed";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not an http(s) URL with a host")]
    BadUrl(String),
    /// One message whether the name does not resolve or resolves to a refused address,
    /// and which address is not said: the message reaches the tenant (the attempt's log),
    /// and would otherwise map the internal names the node can resolve (its hosts file,
    /// an internal DNS). The node's log says which (debug).
    #[error(
        "{host} does not resolve to an address the egress policy allows (it does not \
         resolve here, or to a refused address); an operator can open an address with \
         executor.http_allow (every tenant) or, unless it is one of the cluster's own \
         addresses, executor.tenants.<tenant>.http_allow (one tenant)"
    )]
    NotAllowed { host: String },
    #[error("cannot build an HTTP client: {0}")]
    Client(String),
}

/// This node's egress policy.
#[derive(Debug, Clone, Default)]
pub struct Egress {
    allow: Vec<Cidr>,
    tenant_allow: std::collections::HashMap<String, Vec<Cidr>>,
    /// The cluster's own addresses: every member's configured ones, this host's
    /// interface addresses, and all of loopback when a listener binds a wildcard.
    own: Vec<Cidr>,
}

impl Egress {
    pub fn from_config(c: &Config) -> Result<Egress, cidr::ParseError> {
        let allow = cidr::parse_all(&c.executor.http_allow)?;
        let tenant_allow = c
            .executor
            .tenants
            .iter()
            .map(|(tenant, t)| Ok((tenant.clone(), cidr::parse_all(&t.http_allow)?)))
            .collect::<Result<_, cidr::ParseError>>()?;
        let configured: Vec<IpAddr> = [&c.api_addr, &c.peer_addr]
            .into_iter()
            .chain(c.peers.iter().flat_map(|p| [&p.api_addr, &p.peer_addr]))
            .filter_map(|a| a.parse::<SocketAddr>().ok())
            .map(|a| a.ip())
            .collect();
        // A node listening on 0.0.0.0 or :: answers on every address of its host, loopback
        // (all of 127/8) included; the host's addresses reach its other services too.
        let wildcard = [&c.api_addr, &c.peer_addr]
            .iter()
            .filter_map(|a| a.parse::<SocketAddr>().ok())
            .any(|a| a.ip().is_unspecified());
        let interfaces = if_addrs::get_if_addrs()
            .map(|ifs| ifs.into_iter().map(|i| i.ip()).collect::<Vec<_>>())
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot list this host's addresses for the egress policy; refusing only the configured ones");
                Vec::new()
            });
        let mut own: Vec<Cidr> = configured
            .into_iter()
            .chain(interfaces)
            .filter(|ip| !ip.is_unspecified())
            .filter_map(|ip| ip.to_string().parse().ok())
            .collect();
        if wildcard {
            own.extend(
                ["127.0.0.0/8", "::1/128"]
                    .iter()
                    .filter_map(|n| n.parse::<Cidr>().ok()),
            );
        }
        Ok(Egress {
            allow,
            tenant_allow,
            own,
        })
    }

    /// Whether `tenant`'s tasks and webhooks may connect to `ip`. The cluster's own
    /// addresses open only through the node-wide `http_allow`, never through a tenant's
    /// grant (a tenant granted 10/8 still cannot call the nodes' ports inside it).
    pub fn permits(&self, tenant: &str, ip: IpAddr) -> bool {
        // An IPv6 form that carries an IPv4 address is judged as that address everywhere
        // (grants, own addresses, internal ranges): `::/0` must not open a host's IPv4.
        let ip = embedded_v4(ip).map_or(ip, IpAddr::V4);
        if cidr::any_contains(&self.allow, ip) {
            return true;
        }
        if cidr::any_contains(&self.own, ip) {
            return false;
        }
        let granted = self.tenant_allow.get(tenant).map(Vec::as_slice);
        cidr::any_contains(granted.unwrap_or(&[]), ip) || !is_internal(ip)
    }

    /// Resolve `url`'s host once, check every address against what `tenant` may reach,
    /// and return a client pinned to the first one (no proxy, no redirects, `timeout`
    /// overall).
    pub async fn client_for(
        &self,
        tenant: &str,
        url: &str,
        timeout: Duration,
    ) -> Result<reqwest::Client, Error> {
        let parsed = reqwest::Url::parse(url).map_err(|_| Error::BadUrl(url.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Error::BadUrl(url.to_string()));
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| Error::BadUrl(url.to_string()))?
            .to_string();
        let port = parsed
            .port_or_known_default()
            .ok_or_else(|| Error::BadUrl(url.to_string()))?;
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        let addrs: Vec<SocketAddr> = match literal {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| {
                    tracing::debug!(host = %host, error = %e, "egress: cannot resolve");
                    Error::NotAllowed { host: host.clone() }
                })?
                .collect(),
        };
        let Some(first) = addrs.first().copied() else {
            tracing::debug!(host = %host, "egress: the name resolves to no address");
            return Err(Error::NotAllowed { host });
        };
        if let Some(bad) = addrs.iter().find(|a| !self.permits(tenant, a.ip())) {
            tracing::debug!(host = %host, addr = %bad.ip(), "egress: address refused");
            return Err(Error::NotAllowed { host });
        }
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout);
        if literal.is_none() {
            builder = builder.resolve(&host, first);
        }
        builder.build().map_err(|e| Error::Client(e.to_string()))
    }
}

/// The IPv4 address an IPv6 address carries: IPv4-mapped (`::ffff:a.b.c.d`),
/// IPv4-translated (`::ffff:0:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), 6to4
/// (`2002:aabb:ccdd::/48`) and NAT64 (`64:ff9b::/96`).
fn embedded_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(a) = ip else { return None };
    let s = a.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if let Some(m) = a.to_ipv4_mapped() {
        return Some(m);
    }
    match s {
        [0, 0, 0, 0, 0xffff, 0, hi, lo] => Some(v4(hi, lo)),
        [0, 0, 0, 0, 0, 0, hi, lo] if !a.is_loopback() && !a.is_unspecified() => Some(v4(hi, lo)),
        [0x2002, hi, lo, ..] => Some(v4(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
        _ => None,
    }
}

/// Addresses that are not the public internet.
pub fn is_internal(ip: IpAddr) -> bool {
    match (embedded_v4(ip), ip) {
        (Some(v4), _) | (None, IpAddr::V4(v4)) => is_internal_v4(v4),
        (None, IpAddr::V6(a)) => is_internal_v6(a),
    }
}

fn is_internal_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    a.is_loopback()
        || a.is_private()
        || a.is_link_local()
        || a.is_multicast()
        || a.is_unspecified()
        || a.is_broadcast()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // CGNAT 100.64/10
        || (o[0] == 192 && o[1] == 0 && (o[2] == 0 || o[2] == 2)) // IETF 192.0.0/24, TEST-NET-1
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18/15
        || (o[0] == 198 && o[1] == 51 && o[2] == 100) // TEST-NET-2
        || (o[0] == 203 && o[1] == 0 && o[2] == 113) // TEST-NET-3
        || o[0] >= 240
}

fn is_internal_v6(a: Ipv6Addr) -> bool {
    // Forms that carry an IPv4 address were judged by it already (`embedded_v4`).
    let s = a.segments();
    a.is_loopback()
        || a.is_unspecified()
        || a.is_multicast()
        || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated, still routed inside)
        || (s[0] & 0xfe00) == 0xfc00 // ULA fc00::/7
        || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 64:ff9b::/96 and 64:ff9b:1::/48
        || (s[0] == 0x2001 && s[1] == 0) // Teredo 2001::/32 tunnels to IPv4
        || (s[0] == 0x2001 && s[1] == 0xdb8) // documentation 2001:db8::/32
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0]) // discard-only 100::/64
}

/// HMAC-SHA256 (RFC 2104) of `msg` under `key`.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// A URL's `scheme://host[:port]`, for logs and errors: its path and query may carry a
/// token, which must reach no log line.
pub fn origin(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{}://{h}:{p}", u.scheme()),
            (Some(h), None) => format!("{}://{h}", u.scheme()),
            _ => "(a URL without a host)".into(),
        },
        Err(_) => "(not a URL)".into(),
    }
}

/// The signature header value for a webhook body.
pub fn signature(secret: &str, body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(hmac_sha256(secret.as_bytes(), body))
    )
}

/// The [`TIMED_SIGNATURE_HEADER`] value for a webhook body sent at `unix_secs`.
pub fn timed_signature(secret: &str, unix_secs: u64, body: &[u8]) -> String {
    let mut signed = format!("{unix_secs}.").into_bytes();
    signed.extend_from_slice(body);
    signature(secret, &signed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timed_signature_covers_the_time_and_the_body() {
        let s = timed_signature("k", 1_700_000_000, b"{}");
        assert_eq!(s, signature("k", b"1700000000.{}"));
        assert_ne!(s, timed_signature("k", 1_700_000_001, b"{}"));
        assert_ne!(s, timed_signature("k", 1_700_000_000, b"{ }"));
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_a_url_s_origin_reaches_logs_and_errors() {
        assert_eq!(
            origin("https://h.example:8443/p/secret?token=abc#f"),
            "https://h.example:8443"
        );
        assert_eq!(origin("http://h.example/hook?key=k"), "http://h.example");
        assert_eq!(origin("not a url"), "(not a URL)");
    }

    #[test]
    fn internal_ranges_are_refused_and_public_ones_allowed() {
        let e = Egress::default();
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::a9fe:a9fe",
            "2002:7f00:1::",
            "2002:a00:1::1",
            "2001::1",
            "2001:db8::1",
            "fec0::1",
            "64:ff9b:1::1",
            "192.0.0.1",
            "192.0.2.2",
            "198.18.0.1",
            "198.51.100.1",
            "203.0.113.9",
        ] {
            assert!(!e.permits("t", ip(bad)), "{bad} must be refused");
        }
        for good in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "100.128.0.1",
            "2002:808:808::1",
            "198.20.0.1",
        ] {
            assert!(e.permits("t", ip(good)), "{good} must be allowed");
        }
    }

    #[test]
    fn http_allow_opens_ranges_and_own_addresses_are_refused() {
        let c = Config {
            api_addr: "1.2.3.4:8080".into(),
            peer_addr: "1.2.3.4:9080".into(),
            ..Config::default()
        };
        let e = Egress::from_config(&c).unwrap();
        assert!(e.permits("t", ip("1.2.3.5")), "a public address");
        assert!(!e.permits("t", ip("1.2.3.4")), "the node itself");
        let mut c = c;
        c.executor.http_allow = vec!["127.0.0.0/8".into()];
        let e = Egress::from_config(&c).unwrap();
        assert!(e.permits("t", ip("127.0.0.1")));
        assert!(!e.permits("t", ip("10.0.0.1")));
    }

    #[test]
    fn embedded_ipv4_is_judged_as_ipv4_even_under_a_grant_of_all_ipv6() {
        let mut c = Config::default();
        c.executor.tenants.insert(
            "t".into(),
            crate::config::TenantExecutor {
                http_allow: vec!["::/0".into()],
                ..Default::default()
            },
        );
        let e = Egress::from_config(&c).unwrap();
        for bad in [
            "::10.0.0.5",
            "::ffff:0:a00:5",
            "2002:a00:5::1",
            "64:ff9b::a00:5",
            "::ffff:169.254.169.254",
        ] {
            assert!(!e.permits("t", ip(bad)), "{bad}");
        }
        assert!(e.permits("t", ip("2606:4700::1111")));
        assert!(
            e.permits("t", ip("64:ff9b::808:808")),
            "a public IPv4 through NAT64"
        );
    }

    #[test]
    fn a_tenant_s_grant_opens_a_network_to_that_tenant_only() {
        let mut c = Config {
            api_addr: "10.20.0.9:8080".into(),
            peer_addr: "10.20.0.9:9080".into(),
            ..Config::default()
        };
        c.executor.tenants.insert(
            "etl".into(),
            crate::config::TenantExecutor {
                http_allow: vec!["10.20.0.0/16".into()],
                ..Default::default()
            },
        );
        let e = Egress::from_config(&c).unwrap();
        assert!(e.permits("etl", ip("10.20.3.4")));
        assert!(!e.permits("etl", ip("10.21.0.1")), "outside the grant");
        assert!(!e.permits("other", ip("10.20.3.4")), "another tenant");
        assert!(
            !e.permits("etl", ip("10.20.0.9")),
            "the node itself, inside the grant"
        );
    }

    #[test]
    fn the_host_s_own_addresses_and_a_wildcard_node_s_loopback_stay_closed_to_grants() {
        let grant = |api: &str| {
            let mut c = Config {
                api_addr: api.into(),
                ..Config::default()
            };
            c.executor.tenants.insert(
                "t".into(),
                crate::config::TenantExecutor {
                    http_allow: vec!["0.0.0.0/0".into(), "::/0".into()],
                    ..Default::default()
                },
            );
            Egress::from_config(&c).unwrap()
        };
        // Every address of this host, whatever the node binds.
        let e = grant("127.0.0.1:8080");
        for addr in if_addrs::get_if_addrs().unwrap() {
            assert!(!e.permits("t", addr.ip()), "{} is this host's", addr.ip());
        }
        assert!(e.permits("t", ip("127.0.0.2")), "granted, and not the node");
        // Bound to 0.0.0.0, the node answers on all of loopback.
        let e = grant("0.0.0.0:8080");
        assert!(!e.permits("t", ip("127.0.0.2")));
        assert!(!e.permits("t", ip("::1")));
        assert!(e.permits("t", ip("10.1.2.3")), "granted, not this host");
    }

    #[tokio::test]
    async fn a_refused_literal_never_gets_a_client() {
        let e = Egress::default();
        for url in [
            "http://127.0.0.1:1/x",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]:80/",
            "http://localhost:1/",
        ] {
            let err = e
                .client_for("t", url, Duration::from_secs(1))
                .await
                .unwrap_err();
            assert!(matches!(err, Error::NotAllowed { .. }), "{url}: {err}");
        }
        // A name that does not resolve is said the same way as a refused one: a tenant
        // cannot map the names the node resolves.
        let refused = e
            .client_for("t", "http://localhost:1/", Duration::from_secs(1))
            .await
            .unwrap_err()
            .to_string();
        let unknown = e
            .client_for(
                "t",
                "http://no-such-name.invalid:1/",
                Duration::from_secs(1),
            )
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            refused.replace("localhost", "HOST"),
            unknown.replace("no-such-name.invalid", "HOST")
        );
        assert!(matches!(
            e.client_for("t", "file:///etc/passwd", Duration::from_secs(1))
                .await
                .unwrap_err(),
            Error::BadUrl(_)
        ));
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
