//! TEMPORARY STUB (integrator) — replaced by the policy branch.
use crate::config::{ConfigError, DenyAction, NetworkConfig};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Egress,
    Ingress,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmpv4,
    Icmpv6,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}
pub struct HostAddrs {
    pub ipv4: Vec<Ipv4Addr>,
    pub ipv6: Vec<Ipv6Addr>,
}
pub struct FlowQuery<'a> {
    pub direction: Direction,
    pub protocol: Protocol,
    pub dst: IpAddr,
    pub dst_port: Option<u16>,
    pub domains: &'a [String],
}
pub struct Decision {
    pub action: Action,
    pub reason: String,
}
impl Decision {
    pub fn allowed(&self) -> bool {
        self.action == Action::Allow
    }
}
pub struct Policy {
    preset: String,
    host: HostAddrs,
    deny: DenyAction,
    max: Option<usize>,
}
impl Policy {
    pub fn compile(cfg: &NetworkConfig, host: &HostAddrs) -> Result<Policy, ConfigError> {
        Ok(Policy {
            preset: cfg.policy.clone().unwrap_or("public-only".into()),
            host: HostAddrs {
                ipv4: host.ipv4.clone(),
                ipv6: host.ipv6.clone(),
            },
            deny: cfg.deny_action,
            max: cfg.max_connections,
        })
    }
    pub fn decide(&self, q: &FlowQuery) -> Decision {
        let allow = match self.preset.as_str() {
            "allow-all" => true,
            "none" => false,
            _ => match q.dst {
                IpAddr::V4(a) => {
                    !(a.is_private()
                        || a.is_loopback()
                        || a.is_link_local()
                        || self.host.ipv4.contains(&a))
                }
                _ => false,
            },
        };
        Decision {
            action: if allow { Action::Allow } else { Action::Deny },
            reason: format!("stub preset {}", self.preset),
        }
    }
    pub fn deny_action(&self) -> DenyAction {
        self.deny
    }
    pub fn max_connections(&self) -> Option<usize> {
        self.max
    }
}
