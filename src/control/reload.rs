//! Building the flows' settings from a config, at start-up and at each reload.
//!
//! `run` and a reload (SIGHUP, `ctl reload`) go through the same [`flow_settings`], so a config
//! that would not start does not reload either. A reload re-reads the config files named on
//! the command line (the command line's own options stay as they were), validates everything,
//! and only then installs the result in every link (see `hub::Hub::install`); a config that
//! fails leaves the running one in force and the error is logged and returned to `ctl`.
//!
//! Some settings are fixed for the life of the process, and a reload that changes them is
//! refused with their names: the address pools (the guest holds its addresses), the published
//! ports (their sockets are bound once, before confinement), `dns` (the resolver keeps its
//! cache, which established flows were allowed by) and `tls`/`trust_host_cas` (the guest
//! trusts the CA it was given).

use std::sync::{Arc, Mutex};

use tracing::{error, info, warn};

use super::hub::{Hub, Installed};
use crate::config::addressing::Addressing;
use crate::config::cli::NetworkArgs;
use crate::config::NetworkConfig;
use crate::dns::DnsSettings;
use crate::flow::addrmap::AddressMap;
use crate::flow::FlowSettings;
use crate::ingress::PublishedPorts;
use crate::limits::Limits;
use crate::policy::{HostAddrs, LocalAddrs};
use crate::secrets::SecretSet;
use crate::tls::TlsSettings;

/// What the command line fixed for the life of the process.
#[derive(Clone)]
pub struct Fixed {
    pub net: NetworkArgs,
    pub slot: u32,
    pub mtu: u16,
    pub addressing: Addressing,
    pub limits: Limits,
}

/// A config that cannot be used: the message, and the exit status `run` gives it.
#[derive(Debug)]
pub struct BuildError {
    pub exit_code: u8,
    pub message: String,
}

impl BuildError {
    fn config(message: impl Into<String>) -> Self {
        BuildError {
            exit_code: 2,
            message: message.into(),
        }
    }
}

/// The host's addresses as the policy sees them (`host` group) for this slot.
pub fn host_addrs(config: &NetworkConfig, slot: u32) -> HostAddrs {
    config.gateway_addrs(slot).with_local(LocalAddrs::System)
}

/// The flows' settings from `config`, with the TLS settings and published ports given (made
/// once per process). The effective policy is logged.
pub fn flow_settings(
    fixed: &Fixed,
    config: &NetworkConfig,
    tls: TlsSettings,
    published: Option<Arc<PublishedPorts>>,
) -> Result<FlowSettings, BuildError> {
    let host = host_addrs(config, fixed.slot);
    let policy = config.compile_policy(&host).map_err(|e| BuildError {
        exit_code: e.exit_code() as u8,
        message: e.to_string(),
    })?;
    let policy = Arc::new(policy);
    let summary = crate::explain::PolicySummary::new(config, &policy);
    if summary.domain_rules_blind() {
        warn!("effective policy: {summary}");
    } else {
        info!("effective policy: {summary}");
    }
    let addrmap = Arc::new(AddressMap::new(config.map.clone(), host.addrs().collect()));
    let dns = dns_settings(config, &host, fixed.mtu)
        .map_err(|e| BuildError::config(format!("dns.nameservers: {e}")))?;
    let secrets = match SecretSet::load(config) {
        Ok(set) if set.is_empty() => None,
        Ok(set) => Some(Arc::new(set)),
        Err(e) => {
            return Err(BuildError {
                exit_code: e.exit_code() as u8,
                message: e.to_string(),
            })
        }
    };
    Ok(FlowSettings {
        secrets,
        published,
        policy,
        addrmap,
        addressing: fixed.addressing,
        mtu: fixed.mtu,
        dns,
        dns_intercept_all: config.dns.intercept_all.unwrap_or(true),
        tls,
        limits: fixed.limits.clone(),
    })
}

/// The gateway DNS service's settings from the `dns` table (nameservers resolved now) and the
/// link MTU (UDP answers must fit in one frame).
fn dns_settings(
    config: &NetworkConfig,
    host: &HostAddrs,
    link_mtu: u16,
) -> Result<DnsSettings, String> {
    let upstreams = match DnsSettings::resolve_upstreams(&config.dns.nameservers) {
        Ok(u) => u,
        // No nameserver configured anywhere: names can still be blocked and host aliases
        // answered; everything else gets SERVFAIL.
        Err(e) if config.dns.nameservers.is_empty() => {
            warn!("{e}; the gateway DNS answers SERVFAIL to queries that need an upstream");
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    let mut dns = DnsSettings {
        upstreams,
        rebind_protection: config.rebind_protection(),
        gateway_v4: host.ipv4.clone(),
        gateway_v6: host.ipv6.clone(),
        link_mtu,
        ..DnsSettings::default()
    };
    if let Some(ms) = config.dns.query_timeout_ms {
        dns.query_timeout = std::time::Duration::from_millis(ms);
    }
    if !config.dns.host_aliases.is_empty() {
        dns.host_aliases = config.dns.host_aliases.clone();
    }
    if let Some(n) = config.dns.max_queries_in_flight {
        dns.max_in_flight = n;
    }
    Ok(dns)
}

/// The config keys a reload may not change, from `running` to `new`.
pub fn fixed_keys_changed(running: &NetworkConfig, new: &NetworkConfig) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if running.ipv4_pool != new.ipv4_pool {
        changed.push("ipv4_pool");
    }
    if running.ipv6_pool != new.ipv6_pool {
        changed.push("ipv6_pool");
    }
    if running.ports != new.ports {
        changed.push("ports");
    }
    if running.dns != new.dns || running.dns_rebind_protection != new.dns_rebind_protection {
        changed.push("dns");
    }
    if running.tls != new.tls {
        changed.push("tls");
    }
    if running.trust_host_cas != new.trust_host_cas {
        changed.push("trust_host_cas");
    }
    changed
}

/// Re-reads the config and installs it; one reload at a time.
pub struct Reloader {
    fixed: Fixed,
    hub: Arc<Hub>,
    running: Mutex<NetworkConfig>,
}

impl Reloader {
    pub fn new(fixed: Fixed, hub: Arc<Hub>, running: NetworkConfig) -> Self {
        Reloader {
            fixed,
            hub,
            running: Mutex::new(running),
        }
    }

    /// Re-reads the config files and installs them: what happened, or why not (the running
    /// config then stays). Logged either way.
    pub fn reload(&self) -> Result<Installed, String> {
        let result = self.try_reload();
        match &result {
            Ok(done) => info!(
                generation = done.generation,
                links = done.links,
                late_links = done.late,
                flows_reset = done.flows_reset,
                "config reloaded"
            ),
            Err(e) => error!("reload refused, the running config stays: {e}"),
        }
        result
    }

    fn try_reload(&self) -> Result<Installed, String> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let config = self.fixed.net.resolve().map_err(|e| e.to_string())?;
        let changed = fixed_keys_changed(&running, &config);
        if !changed.is_empty() {
            return Err(format!(
                "{} cannot change while netfence runs (restart it for that)",
                changed.join(", ")
            ));
        }
        let (_, current) = self.hub.current_settings();
        let flows = flow_settings(
            &self.fixed,
            &config,
            current.tls.clone(),
            current.published.clone(),
        )
        .map_err(|e| e.message)?;
        let installed = self.hub.install(flows);
        *running = config;
        Ok(installed)
    }
}
