//! TEMPORARY STUB (integrator) — replaced by the policy branch.
pub mod cli;
use std::net::{IpAddr, SocketAddr};
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenyAction {
    #[default]
    Drop,
    Reject,
}
#[derive(Debug, Clone)]
pub struct AddressMapEntry {
    pub guest: IpAddr,
    pub guest_port: Option<u16>,
    pub host: IpAddr,
    pub host_port: Option<u16>,
}
impl AddressMapEntry {
    pub fn map(&self, dst: SocketAddr) -> Option<SocketAddr> {
        if dst.ip() != self.guest || self.guest_port.is_some_and(|p| p != dst.port()) {
            return None;
        }
        Some(SocketAddr::new(
            self.host,
            self.host_port.unwrap_or(dst.port()),
        ))
    }
}
fn split(s: &str) -> Result<(IpAddr, Option<u16>), String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok((a.ip(), Some(a.port())));
    }
    s.parse::<IpAddr>()
        .map(|i| (i, None))
        .map_err(|e| e.to_string())
}
impl std::str::FromStr for AddressMapEntry {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (g, h) = s.split_once('=').ok_or("missing =")?;
        let (guest, guest_port) = split(g)?;
        let (host, host_port) = split(h)?;
        Ok(AddressMapEntry {
            guest,
            guest_port,
            host,
            host_port,
        })
    }
}
#[derive(Debug, Clone, Default)]
pub struct NetworkConfig {
    pub map: Vec<AddressMapEntry>,
    pub ipv4_pool: Option<ipnet::Ipv4Net>,
    pub policy: Option<String>,
    pub deny_action: DenyAction,
    pub max_connections: Option<usize>,
}
#[derive(Debug)]
pub struct ConfigError(pub String);
impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ConfigError {}
impl ConfigError {
    pub fn exit_code(&self) -> i32 {
        2
    }
}
