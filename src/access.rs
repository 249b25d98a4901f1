//! Who may connect: a CIDR allow-list per listener.
//!
//! LMTP has no authentication, so the network is the only gate. Each TCP
//! listener carries an [`AllowList`]; a client whose address matches none of
//! its networks is answered `554 5.7.1` and closed before a session starts
//! (`io::admit` asks). The default is loopback only (`127.0.0.0/8`, `::1`).
//! UNIX sockets are gated by file permissions instead (owner, group, mode).
//!
//! Must not: do I/O or allocate per check. A check is a scan of a short list
//! of prefixes; the list is bounded by [`NETWORKS_MAX`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Networks in one allow-list at most. An allow-list is a handful of
/// operator-written prefixes; the scan is linear, so keep it short.
pub const NETWORKS_MAX: usize = 1024;

/// One network: an address and a prefix length (`10.0.0.0/8`, `::1/128`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` lies in this network. IPv4-mapped IPv6 addresses
    /// (`::ffff:192.0.2.1`) match IPv4 networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `10.0.0.0/8`, `2001:db8::/32`, or a bare address (one host).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "'{s}' is not a network; write ADDRESS/PREFIX (\"10.0.0.0/8\", \"2001:db8::/32\") or one address"
            )
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("'{s}': the prefix length must be 0 to {bits}"))?,
        };
        let net = Cidr { addr, prefix };
        // Host bits set (`10.1.2.3/8`) usually mean a typo; say so rather
        // than silently widening or narrowing what the operator meant.
        if net.network() != addr {
            return Err(format!(
                "'{s}': address has bits set beyond the /{prefix} prefix; write the network address ({}/{prefix})",
                net.network()
            ));
        }
        Ok(net)
    }
}

impl Cidr {
    /// The address with its host bits cleared.
    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        }
    }
}

/// The networks allowed to connect to one listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowList {
    nets: Vec<Cidr>,
}

impl AllowList {
    /// `127.0.0.0/8` and `::1`: the default.
    pub fn loopback() -> AllowList {
        AllowList {
            nets: vec![
                Cidr {
                    addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
                    prefix: 8,
                },
                Cidr {
                    addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
                    prefix: 128,
                },
            ],
        }
    }

    /// Parses a configured list; the error names the bad entry and the fix.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<AllowList, String> {
        if entries.len() > NETWORKS_MAX {
            return Err(format!(
                "{} networks; at most {NETWORKS_MAX} (merge them into wider prefixes)",
                entries.len()
            ));
        }
        let nets = entries
            .iter()
            .map(|e| e.as_ref().parse::<Cidr>())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AllowList { nets })
    }

    /// Whether a client at `ip` may connect.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(ip))
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.nets.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_matches_networks() {
        let l = AllowList::parse(&["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]).unwrap();
        assert!(l.allows(ip("10.255.1.2")));
        assert!(!l.allows(ip("11.0.0.1")));
        assert!(l.allows(ip("192.0.2.7")));
        assert!(!l.allows(ip("192.0.2.8")));
        assert!(l.allows(ip("2001:db8:1::5")));
        assert!(!l.allows(ip("2001:db9::5")));
        // An IPv4-mapped IPv6 peer matches the IPv4 network.
        assert!(l.allows(ip("::ffff:10.1.1.1")));
        assert_eq!(l.to_string(), "10.0.0.0/8,192.0.2.7/32,2001:db8::/32");
    }

    #[test]
    fn default_is_loopback_only() {
        let l = AllowList::loopback();
        assert!(l.allows(ip("127.0.0.1")));
        assert!(l.allows(ip("127.0.0.2")));
        assert!(l.allows(ip("::1")));
        assert!(!l.allows(ip("192.0.2.1")));
        assert!(!l.allows(ip("::2")));
    }

    #[test]
    fn everyone_and_no_one() {
        let all = AllowList::parse(&["0.0.0.0/0", "::/0"]).unwrap();
        assert!(all.allows(ip("203.0.113.9")) && all.allows(ip("2001:db8::1")));
        let none = AllowList::parse::<&str>(&[]).unwrap();
        assert!(!none.allows(ip("127.0.0.1")));
    }

    #[test]
    fn bad_entries_name_the_fix() {
        let e = AllowList::parse(&["10.1.2.3/8"]).unwrap_err();
        assert!(e.contains("10.0.0.0/8"), "{e}");
        let e = AllowList::parse(&["10.0.0.0/33"]).unwrap_err();
        assert!(e.contains("0 to 32"), "{e}");
        let e = AllowList::parse(&["localhost"]).unwrap_err();
        assert!(e.contains("ADDRESS/PREFIX"), "{e}");
        let many: Vec<String> = (0..=NETWORKS_MAX)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        assert!(AllowList::parse(&many).unwrap_err().contains("at most"));
    }
}
