//! Published ports (`-p/--publish [BIND:]HOST_PORT:GUEST_PORT[/udp]`, config `ports = [...]`):
//! a host listener whose connections are carried into the guest. The reference's `PortBinding`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// Protocol of a published port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    #[default]
    Tcp,
    Udp,
}

impl fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
        })
    }
}

fn default_bind() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

fn is_default_bind(b: &IpAddr) -> bool {
    *b == default_bind()
}

fn is_tcp(p: &PortProtocol) -> bool {
    *p == PortProtocol::Tcp
}

/// One published port. In a config file either a table
/// `{ host_port = 8080, guest_port = 80, bind = "127.0.0.1", protocol = "tcp" }` or the
/// command-line string `"[BIND:]HOST_PORT:GUEST_PORT[/udp]"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishSpec {
    /// Host address to listen on; default 127.0.0.1.
    #[serde(default = "default_bind", skip_serializing_if = "is_default_bind")]
    pub bind: IpAddr,
    pub host_port: u16,
    pub guest_port: u16,
    #[serde(default, skip_serializing_if = "is_tcp")]
    pub protocol: PortProtocol,
}

/// Wrapper so a `ports` entry may be a string or a table.
#[derive(Serialize)]
#[serde(transparent)]
pub(crate) struct PublishEntry(pub PublishSpec);

impl<'de> Deserialize<'de> for PublishEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PublishEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(
                    f,
                    "\"[BIND:]HOST_PORT:GUEST_PORT[/udp]\" or a {{host_port, guest_port, bind, protocol}} table"
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PublishEntry, E> {
                v.parse().map(PublishEntry).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PublishEntry, A::Error> {
                let p = PublishSpec::deserialize(de::value::MapAccessDeserializer::new(map))?;
                match p.problem() {
                    Some(e) => Err(de::Error::custom(e)),
                    None => Ok(PublishEntry(p)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

pub(crate) mod entries {
    use super::*;
    use serde::Serializer;

    pub fn serialize<S: Serializer>(v: &[PublishSpec], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|p| PublishEntry(*p)))
    }

    /// A list of bindings (strings or tables), or the reference's mapping form
    /// `{ "8080" = 80 }` (host port -> guest port, TCP on 127.0.0.1).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PublishSpec>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<PublishSpec>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(
                    f,
                    "a list of \"[BIND:]HOST_PORT:GUEST_PORT[/udp]\" strings or tables, \
                     or a table of HOST_PORT = GUEST_PORT"
                )
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = seq.next_element::<PublishEntry>()? {
                    v.push(e.0);
                }
                Ok(v)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(host) = map.next_key::<String>()? {
                    let guest: u16 = map.next_value()?;
                    let spec = PublishSpec {
                        bind: default_bind(),
                        host_port: host.parse().map_err(|_| {
                            de::Error::custom(format!("host port `{host}` is not a port 1-65535"))
                        })?,
                        guest_port: guest,
                        protocol: PortProtocol::Tcp,
                    };
                    if let Some(e) = spec.problem() {
                        return Err(de::Error::custom(e));
                    }
                    v.push(spec);
                }
                Ok(v)
            }
        }
        d.deserialize_any(V)
    }
}

impl PublishSpec {
    /// Why this binding is invalid, if it is.
    pub fn problem(&self) -> Option<String> {
        if self.host_port == 0 {
            Some("host_port 0 is not allowed; expected 1-65535".into())
        } else if self.guest_port == 0 {
            Some("guest_port 0 is not allowed; expected 1-65535".into())
        } else {
            None
        }
    }
}

const PUBLISH_FORMAT: &str =
    "[BIND:]HOST_PORT:GUEST_PORT[/udp], e.g. 8080:80, 0.0.0.0:5353:53/udp, [::1]:8080:80";

impl FromStr for PublishSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("publish `{s}`: {why}; expected {PUBLISH_FORMAT}");
        let (body, protocol) = match s.rsplit_once('/') {
            Some((b, "tcp")) => (b, PortProtocol::Tcp),
            Some((b, "udp")) => (b, PortProtocol::Udp),
            Some((_, p)) => return Err(bad(&format!("unknown protocol `{p}` (tcp or udp)"))),
            None => (s, PortProtocol::Tcp),
        };
        let (bind_s, ports) = if let Some(inner) = body.strip_prefix('[') {
            let (addr, rest) = inner
                .split_once("]:")
                .ok_or_else(|| bad("`[` without `]:`"))?;
            (Some(addr), rest)
        } else {
            let parts: Vec<&str> = body.split(':').collect();
            match parts.len() {
                2 => (None, body),
                3 => (Some(parts[0]), &body[parts[0].len() + 1..]),
                _ => return Err(bad("wrong number of `:`")),
            }
        };
        let bind = match bind_s {
            Some(b) => b
                .parse::<IpAddr>()
                .map_err(|_| bad(&format!("bind address `{b}` is not an IP address")))?,
            None => default_bind(),
        };
        let (h, g) = ports
            .split_once(':')
            .ok_or_else(|| bad("missing GUEST_PORT"))?;
        let port = |p: &str, which: &str| -> Result<u16, String> {
            match p.parse::<u32>() {
                Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
                _ => Err(bad(&format!("{which} `{p}` is not a port 1-65535"))),
            }
        };
        Ok(PublishSpec {
            bind,
            host_port: port(h, "HOST_PORT")?,
            guest_port: port(g, "GUEST_PORT")?,
            protocol,
        })
    }
}

impl fmt::Display for PublishSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bind {
            IpAddr::V6(v6) => write!(f, "[{v6}]:")?,
            IpAddr::V4(v4) => write!(f, "{v4}:")?,
        }
        write!(f, "{}:{}", self.host_port, self.guest_port)?;
        if self.protocol == PortProtocol::Udp {
            f.write_str("/udp")?;
        }
        Ok(())
    }
}
