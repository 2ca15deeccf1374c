//! IP networks in CIDR notation (`10.0.0.0/8`, `fd00::/8`, a bare address for one host):
//! parsing and membership. Used for the peer networks members must live in.

use std::net::IpAddr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{0}' is not an IP network (e.g. 10.0.0.0/8, fd00::/8 or 192.168.1.7)")]
pub struct ParseError(pub String);

/// One network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Cidr, ParseError> {
        let bad = || ParseError(s.to_string());
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Parse a list of networks, naming the first bad one.
pub fn parse_all(list: &[String]) -> Result<Vec<Cidr>, ParseError> {
    list.iter().map(|s| s.parse()).collect()
}

/// Whether `ip` is in any of `nets`.
pub fn any_contains(nets: &[Cidr], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn membership_by_prefix() {
        let n: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains(ip("10.255.1.2")));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(n.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped");
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        let host: Cidr = "192.168.1.7".parse().unwrap();
        assert!(host.contains(ip("192.168.1.7")) && !host.contains(ip("192.168.1.8")));
        let ula: Cidr = "fc00::/7".parse().unwrap();
        assert!(ula.contains(ip("fd12::1")) && !ula.contains(ip("fe80::1")));
        assert!(!ula.contains(ip("10.0.0.1")));
    }

    #[test]
    fn bad_networks_are_named() {
        for s in ["10.0.0.0/33", "nope", "::1/129", "1.2.3.4/x"] {
            assert_eq!(s.parse::<Cidr>(), Err(ParseError(s.to_string())));
        }
    }
}
