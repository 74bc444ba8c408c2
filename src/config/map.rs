//! Address map (`--map GUEST_IP[:PORT]=HOST_IP[:PORT]`, config `map = [...]`): the host-side
//! connection for a guest-visible destination goes to another address. Policy still judges the
//! guest-visible address; only the host socket's peer changes. Tests use it to send
//! documentation-range "public" destinations to loopback servers.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::policy::canonical;

/// One entry of the address map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddressMapEntry {
    /// The destination as the guest addresses it.
    pub guest: IpAddr,
    /// Only this destination port; `None` = every port.
    pub guest_port: Option<u16>,
    /// Where the host socket connects instead.
    pub host: IpAddr,
    /// The host-side port; `None` = the guest's destination port.
    pub host_port: Option<u16>,
}

impl AddressMapEntry {
    /// The host-side address for a guest destination, if this entry covers it. Mapped and
    /// compatible IPv6 spellings of an IPv4 guest address are covered too.
    pub fn map(&self, dst: SocketAddr) -> Option<SocketAddr> {
        if canonical(dst.ip()) != canonical(self.guest) {
            return None;
        }
        if self.guest_port.is_some_and(|p| p != dst.port()) {
            return None;
        }
        Some(SocketAddr::new(
            self.host,
            self.host_port.unwrap_or(dst.port()),
        ))
    }

    /// The host side of the first entry of `entries` that covers `dst`.
    pub fn lookup(entries: &[AddressMapEntry], dst: SocketAddr) -> Option<SocketAddr> {
        entries.iter().find_map(|e| e.map(dst))
    }
}

const MAP_FORMAT: &str = "GUEST_IP[:PORT]=HOST_IP[:PORT] (IPv6 as [addr]:port), \
     e.g. 203.0.113.7:80=127.0.0.1:8080";

fn parse_side(s: &str, whole: &str, which: &str) -> Result<(IpAddr, Option<u16>), String> {
    let bad =
        |why: String| format!("map `{whole}`: {which} side `{s}` {why}; expected {MAP_FORMAT}");
    let port = |p: &str| -> Result<u16, String> {
        match p.parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
            _ => Err(bad(format!("has port `{p}`, not a number 1-65535"))),
        }
    };
    if let Some(inner) = s.strip_prefix('[') {
        let (addr, after) = inner
            .split_once(']')
            .ok_or_else(|| bad("has `[` without `]`".into()))?;
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| bad(format!("has `{addr}`, not an IP address")))?;
        let p = match after {
            "" => None,
            _ => Some(port(after.strip_prefix(':').ok_or_else(|| {
                bad("has text after `]` that is not `:PORT`".into())
            })?)?),
        };
        return Ok((ip, p));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    match s.split_once(':') {
        Some((a, p)) if !p.contains(':') => {
            let ip: IpAddr = a
                .parse()
                .map_err(|_| bad(format!("has `{a}`, not an IP address")))?;
            Ok((ip, Some(port(p)?)))
        }
        _ => Err(bad("is not an IP address".into())),
    }
}

impl FromStr for AddressMapEntry {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (g, h) = s
            .split_once('=')
            .ok_or_else(|| format!("map `{s}` has no `=`; expected {MAP_FORMAT}"))?;
        let (guest, guest_port) = parse_side(g.trim(), s, "guest")?;
        let (host, host_port) = parse_side(h.trim(), s, "host")?;
        let e = AddressMapEntry {
            guest,
            guest_port,
            host,
            host_port,
        };
        match e.problem() {
            Some(p) => Err(format!("map `{s}`: {p}")),
            None => Ok(e),
        }
    }
}

impl AddressMapEntry {
    /// Why this entry is unusable, if it is.
    pub fn problem(&self) -> Option<String> {
        if canonical(self.guest).is_unspecified() {
            return Some(format!(
                "guest address `{}` is unspecified; name the address the guest connects to",
                self.guest
            ));
        }
        if self.host.is_unspecified() {
            return Some(format!(
                "host address `{}` is unspecified; name a host address such as 127.0.0.1",
                self.host
            ));
        }
        if self.guest_port == Some(0) || self.host_port == Some(0) {
            return Some("port 0 is not allowed; expected 1-65535".into());
        }
        None
    }
}

fn fmt_side(f: &mut fmt::Formatter<'_>, ip: IpAddr, port: Option<u16>) -> fmt::Result {
    match (ip, port) {
        (IpAddr::V6(v6), Some(p)) => write!(f, "[{v6}]:{p}"),
        (ip, Some(p)) => write!(f, "{ip}:{p}"),
        (ip, None) => write!(f, "{ip}"),
    }
}

impl fmt::Display for AddressMapEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_side(f, self.guest, self.guest_port)?;
        f.write_str("=")?;
        fmt_side(f, self.host, self.host_port)
    }
}

impl Serialize for AddressMapEntry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AddressMapEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
