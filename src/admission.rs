//! What a client may cost before it has authenticated: how many connections each listener
//! holds open (in all, and per client address on the API listener), and how many failed
//! authentications one address may make before its requests are refused unread.
//!
//! Both are counted by each node for itself: they guard that node's file descriptors,
//! memory and CPU, which is what a flood from one address costs it. The per-tenant rate
//! limit (`rate_limit`) applies only once a request has authenticated.

use std::collections::HashMap;
use std::future::{ready, Ready};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum_server::accept::Accept;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::cidr::{self, Cidr};
use crate::telemetry::metrics::CONNECTIONS_REFUSED;

/// Where a client comes from, for per-address limits: an IPv4 address (also when it comes
/// IPv4-mapped or through NAT64, `64:ff9b::/96`), or the /64 an IPv6 address is in (one
/// host usually holds a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4(u32),
    V6(u64),
}

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(a) => ClientKey::V4(a.into()),
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                if let Some(v4) = a.to_ipv4_mapped() {
                    ClientKey::V4(v4.into())
                } else if bits >> 32 == NAT64_PREFIX {
                    ClientKey::V4(bits as u32)
                } else {
                    ClientKey::V6((bits >> 64) as u64)
                }
            }
        }
    }
}

/// `64:ff9b::/96`, the well-known NAT64 prefix, as the top 96 bits of an address.
const NAT64_PREFIX: u128 = 0x0064_ff9b_0000_0000_0000_0000;

/// Open connections per client address.
type AddressCounts = Arc<Mutex<HashMap<ClientKey, u32>>>;

/// One listener's connection limits, as its acceptor: a connection beyond them is closed
/// as it arrives, before a byte of it is read.
#[derive(Clone)]
pub struct ConnectionLimit {
    listener: &'static str,
    total: Arc<Semaphore>,
    per_address: Option<(u32, AddressCounts)>,
    /// Networks a connection must come from (the peer listener: the peer networks and
    /// the configured peers); None: any.
    sources: Option<Arc<Vec<Cidr>>>,
    /// Addresses the per-address cap does not hold (the configured members, which pool
    /// many connections to each other and may share one address).
    exempt: Arc<Vec<IpAddr>>,
}

impl ConnectionLimit {
    /// At most `total` connections at once, and `per_address` from one client address.
    pub fn new(listener: &'static str, total: u32, per_address: Option<u32>) -> Self {
        ConnectionLimit {
            listener,
            total: Arc::new(Semaphore::new(total as usize)),
            per_address: per_address.map(|max| (max, Arc::default())),
            sources: None,
            exempt: Arc::default(),
        }
    }

    /// Connections from `addrs` count towards the total only.
    pub fn exempt(mut self, addrs: Vec<IpAddr>) -> Self {
        self.exempt = Arc::new(addrs);
        self
    }

    /// Only connections from `sources` (anything else is closed as it arrives).
    pub fn only_from(mut self, sources: Vec<Cidr>) -> Self {
        self.sources = Some(Arc::new(sources));
        self
    }

    fn admit(&self, stream: &TcpStream) -> Result<Place, &'static str> {
        if let Some(sources) = &self.sources {
            let ip = stream.peer_addr().map_err(|_| "no_peer_address")?.ip();
            if !cidr::any_contains(sources, ip) {
                return Err("foreign_address");
            }
        }
        let permit = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| "listener_full")?;
        let ip = stream.peer_addr().map_err(|_| "no_peer_address")?.ip();
        let Some((max, counts)) = self
            .per_address
            .as_ref()
            .filter(|_| !self.exempt.contains(&ip))
        else {
            return Ok(Place {
                _permit: permit,
                address: None,
            });
        };
        let key = ClientKey::of(ip);
        let mut held = counts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = held.entry(key).or_insert(0);
        if *n >= *max {
            return Err("address_full");
        }
        *n += 1;
        Ok(Place {
            _permit: permit,
            address: Some((key, counts.clone())),
        })
    }
}

/// A connection's place under its listener's limits, given back when it closes.
struct Place {
    _permit: OwnedSemaphorePermit,
    address: Option<(ClientKey, AddressCounts)>,
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some((key, counts)) = &self.address {
            let mut held = counts.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = held.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    held.remove(key);
                }
            }
        }
    }
}

/// An admitted connection: the stream, holding its place until it is dropped.
pub struct Admitted<S> {
    stream: S,
    _place: Place,
}

impl<S> Accept<TcpStream, S> for ConnectionLimit {
    type Stream = Admitted<TcpStream>;
    type Service = S;
    type Future = Ready<io::Result<(Self::Stream, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        ready(match self.admit(&stream) {
            Ok(place) => Ok((
                Admitted {
                    stream,
                    _place: place,
                },
                service,
            )),
            Err(reason) => {
                ::metrics::counter!(CONNECTIONS_REFUSED, "listener" => self.listener, "reason" => reason)
                    .increment(1);
                tracing::debug!(listener = self.listener, reason, "connection refused");
                // The server drops the stream, which closes the connection.
                Err(io::Error::other(reason))
            }
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Admitted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Admitted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Addresses tracked at most. Past it, addresses whose allowance is whole again are
/// forgotten (at most one sweep a second), and while it stays full a new address takes
/// the place of an arbitrary one.
const MAX_TRACKED: usize = 100_000;

/// Failed authentications per client address: a token bucket per address that only
/// failures drain. Written by hand because the rate-limit crates (governor) charge every
/// check: here a request must be refused before its token is read once earlier ones from
/// its address failed, while requests that authenticate cost nothing.
pub struct AuthFailures {
    per_second: f64,
    burst: f64,
    buckets: Mutex<Buckets>,
}

#[derive(Default)]
struct Buckets {
    by_client: HashMap<ClientKey, Bucket>,
    swept: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    allowance: f64,
    at: Instant,
}

impl AuthFailures {
    /// An allowance of `burst` failures per address, refilling at `per_minute`.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        AuthFailures {
            per_second: f64::from(per_minute.max(1)) / 60.0,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::default(),
        }
    }

    fn allowance(&self, b: Bucket, now: Instant) -> f64 {
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.per_second;
        (b.allowance + refill).min(self.burst)
    }

    /// Whether a request from `ip` may try to authenticate; if not, how long until it may.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(b) = buckets.by_client.get(&ClientKey::of(ip)) else {
            return Ok(());
        };
        let allowance = self.allowance(*b, now);
        if allowance >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - allowance) / self.per_second))
        }
    }

    /// Count a failed authentication from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let key = ClientKey::of(ip);
        let mut guard = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let buckets = &mut *guard;
        if buckets.by_client.len() >= MAX_TRACKED && !buckets.by_client.contains_key(&key) {
            let due = buckets
                .swept
                .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1));
            if due {
                buckets.swept = Some(now);
                let burst = self.burst;
                buckets
                    .by_client
                    .retain(|_, b| self.allowance(*b, now) < burst);
            }
            if buckets.by_client.len() >= MAX_TRACKED {
                if let Some(evicted) = buckets.by_client.keys().next().copied() {
                    buckets.by_client.remove(&evicted);
                }
            }
        }
        let b = buckets.by_client.entry(key).or_insert(Bucket {
            allowance: self.burst,
            at: now,
        });
        // Requests that passed the check together may all fail: the allowance goes below
        // zero (a longer wait), but never below one burst's worth.
        let allowance = (self.allowance(*b, now) - 1.0).max(-self.burst);
        *b = Bucket { allowance, at: now };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_refused_after_its_burst_of_failures_and_readmitted_as_it_refills() {
        let f = AuthFailures::new(120, 3);
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        for _ in 0..3 {
            assert!(f.check(a, t0).is_ok());
            f.failed(a, t0);
        }
        let wait = f
            .check(a, t0)
            .expect_err("the fourth try is refused unread");
        assert_eq!(wait, Duration::from_millis(500));
        assert!(
            f.check(other, t0).is_ok(),
            "another address is not affected"
        );
        assert!(f.check(a, t0 + Duration::from_millis(499)).is_err());
        assert!(f.check(a, t0 + Duration::from_millis(500)).is_ok());
        // The allowance refills to the burst, no further.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(f.check(a, later).is_ok());
            f.failed(a, later);
        }
        assert!(f.check(a, later).is_err());
    }

    #[test]
    fn ipv6_addresses_of_one_slash_64_are_one_client_and_mapped_ipv4_is_ipv4() {
        let k = |s: &str| ClientKey::of(s.parse().unwrap());
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("::ffff:192.0.2.1"), k("192.0.2.1"));
        assert_eq!(k("64:ff9b::c000:201"), k("192.0.2.1"));
        assert_ne!(k("64:ff9b::c000:202"), k("192.0.2.1"));
    }
}
