//! The user-facing network configuration: the reference's `Network` model with its wire names
//! (see `../shared/reference/`), read from TOML or JSON (by file extension) and from the command
//! line ([`cli::NetworkArgs`]), then validated before anything is opened.
//!
//! Theory of operation: [`load`] parses a file into [`NetworkConfig`] with `serde`
//! (`deny_unknown_fields` everywhere, every error carrying its field path); the command line is
//! merged on top by [`cli::NetworkArgs::resolve`]; [`NetworkConfig::validate`] checks what the
//! types alone cannot (ICMP in ingress rules, reversed port ranges, domain names, duplicate
//! bindings...). Every error is a [`ConfigError`] naming the field path, the value and what is
//! accepted; the process exits 2 on it. [`NetworkConfig::compile_policy`] validates and hands
//! the policy engine ([`crate::policy::Policy`]) its parts; `config` depends on `policy`, never
//! the reverse.

pub mod addressing;
pub mod cli;
mod map;
#[cfg(test)]
mod policy_tests;
mod publish;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use map::AddressMapEntry;
pub use publish::{PortProtocol, PublishSpec};
// The policy vocabulary, under the names config users have always imported.
pub use crate::policy::{
    parse_cidr, parse_domain, DenyAction, Destination, PortRange, Preset, RuleDirection, RuleSpec,
};

use crate::policy::{Action, HostAddrs, Policy, PolicyParts};

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A configuration or argument error: which field, which value, what would be accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the error is in, if it came from one.
    pub file: Option<PathBuf>,
    /// Field path, e.g. `rules[2].protocols[0]` or `--net-rule`.
    pub field: String,
    /// The offending value as written, if known.
    pub value: Option<String>,
    /// What is wrong and what is accepted.
    pub message: String,
}

impl ConfigError {
    pub fn new(
        field: impl Into<String>,
        value: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            file: None,
            field: field.into(),
            value,
            message: message.into(),
        }
    }

    /// The process exit code for configuration errors (stable: 2).
    pub fn exit_code(&self) -> i32 {
        2
    }

    fn in_file(mut self, path: &Path) -> Self {
        self.file = Some(path.to_path_buf());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if !self.field.is_empty() {
            f.write_str(&self.field)?;
            if let Some(v) = &self.value {
                write!(f, " = {v:?}")?;
            }
            f.write_str(": ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------

/// The `policy` table: per-direction defaults and ordered rules. `preset` is a netfence
/// extension so that a preset and explicit defaults can be combined (the command line does).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTable {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// Fall-through for egress; default deny.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_egress: Option<Action>,
    /// Fall-through for ingress; default allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_ingress: Option<Action>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSpec>,
}

/// `policy`: a preset name or a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySpec {
    Preset(Preset),
    Table(PolicyTable),
}

impl Serialize for PolicySpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PolicySpec::Preset(p) => p.serialize(s),
            PolicySpec::Table(t) => t.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for PolicySpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PolicySpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(
                    f,
                    "a preset name (none, public-only, allow-all, non-local) or a table \
                     {{ default_egress, default_ingress, rules }}"
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PolicySpec, E> {
                v.parse().map(PolicySpec::Preset).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PolicySpec, A::Error> {
                PolicyTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(PolicySpec::Table)
            }
        }
        d.deserialize_any(V)
    }
}

/// Action when a secret placeholder is sent to a host outside the secret's allow list.
/// The default is `block_and_log`, as the Python reference says (the Rust reference page says
/// `Block`; netfence keeps the one that leaves a trace). Ordered by severity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationAction {
    /// Drop the request.
    Block,
    /// Drop the request and log a warning (the default).
    #[default]
    BlockAndLog,
    /// Drop the request, log an error and shut the sandbox's networking down.
    BlockAndTerminate,
}

impl FromStr for ViolationAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "block" => Ok(ViolationAction::Block),
            "block_and_log" => Ok(ViolationAction::BlockAndLog),
            "block_and_terminate" => Ok(ViolationAction::BlockAndTerminate),
            _ => Err(format!(
                "unknown violation action `{s}`; expected block, block_and_log or block_and_terminate"
            )),
        }
    }
}

impl fmt::Display for ViolationAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ViolationAction::Block => "block",
            ViolationAction::BlockAndLog => "block_and_log",
            ViolationAction::BlockAndTerminate => "block_and_terminate",
        })
    }
}

impl<'de> Deserialize<'de> for ViolationAction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// One secret: the guest sees `placeholder` in `env_var`; netfence substitutes the real value
/// only in HTTP requests to `allowed_hosts` (names or `*.suffix` patterns), in the parts named
/// by `substitute_in`. The value comes from exactly one of `value` (inline), `value_env` (an
/// environment variable of netfence itself) or `value_file` (a file, trailing newline
/// stripped); the last two are read at start by [`crate::secrets::SecretSet::load`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretEntry {
    pub env_var: String,
    /// The value itself. Never printed: Debug and serialisation show `<redacted>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<SecretValue>,
    /// The name of an environment variable of netfence's own process that holds the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_env: Option<String>,
    /// A file that holds the value (one trailing newline is stripped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_file: Option<PathBuf>,
    /// What the guest sees; default [`default_placeholder`] of `env_var`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholder: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_violation: Option<ViolationAction>,
    /// Where in a request the placeholder is replaced; default `["headers"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substitute_in: Option<Vec<SubstitutePart>>,
}

impl fmt::Debug for SecretEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretEntry")
            .field("env_var", &self.env_var)
            .field("value", &self.value)
            .field("value_env", &self.value_env)
            .field("value_file", &self.value_file)
            .field("placeholder", &self.placeholder)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("on_violation", &self.on_violation)
            .field("substitute_in", &self.substitute_in)
            .finish()
    }
}

impl SecretEntry {
    /// The placeholder the guest sees: `placeholder`, else [`default_placeholder`].
    pub fn effective_placeholder(&self) -> String {
        self.placeholder
            .clone()
            .unwrap_or_else(|| default_placeholder(&self.env_var))
    }

    /// The parts of a request where the placeholder is replaced (default: headers only).
    pub fn effective_substitute_in(&self) -> Vec<SubstitutePart> {
        self.substitute_in
            .clone()
            .unwrap_or_else(|| vec![SubstitutePart::Headers])
    }
}

/// The prefix of every derived placeholder.
pub const PLACEHOLDER_PREFIX: &str = "NETFENCE_PLACEHOLDER_";

/// The placeholder of a secret that does not set one:
/// `NETFENCE_PLACEHOLDER_<ENV_VAR>_<h>`, where `<h>` is the first 32 lower-case hex digits of
/// SHA-256 of `netfence-placeholder-v1:<ENV_VAR>`. It depends on the name only, so it is the
/// same on every start and a launcher can compute it without netfence (`printf
/// 'netfence-placeholder-v1:%s' "$ENV_VAR" | sha256sum | cut -c1-32`) or ask `netfence secrets
/// env`. The prefix makes it distinctive, and the hash keeps one secret's placeholder from
/// being the beginning of another's (`API` vs `API_2`).
pub fn default_placeholder(env_var: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("netfence-placeholder-v1:{env_var}").as_bytes(),
    );
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{PLACEHOLDER_PREFIX}{env_var}_{hex}")
}

/// Placeholder lengths accepted (derived ones are 54 bytes plus the variable's name).
pub const PLACEHOLDER_LEN: std::ops::RangeInclusive<usize> = 16..=256;
/// Longest accepted `env_var` (so a derived placeholder stays within [`PLACEHOLDER_LEN`]).
pub const ENV_VAR_MAX_LEN: usize = 128;
/// Longest accepted secret value, in bytes.
pub const SECRET_VALUE_MAX_BYTES: usize = 16 * 1024;

/// A secret value as the config holds it. It is never shown: `Debug` and serialisation write
/// `<redacted>`, a wrongly typed value is rejected without echoing it, and the memory is
/// zeroed when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(zeroize::Zeroizing<String>);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> Self {
        SecretValue(zeroize::Zeroizing::new(value.into()))
    }

    /// The value itself: only for the substitution tables, never for output.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// What `Debug`, `netfence config` and every other rendering show instead of a value.
pub const REDACTED: &str = "<redacted>";

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for SecretValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for SecretValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str = "a string (the value given is not shown)";
        fn wrong<E: de::Error>() -> E {
            E::custom(format!("invalid type: expected {EXPECTED}"))
        }
        impl<'de> Visitor<'de> for V {
            type Value = SecretValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SecretValue, E> {
                Ok(SecretValue::new(v))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<SecretValue, E> {
                Ok(SecretValue::new(v))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<SecretValue, E> {
                Err(wrong())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<SecretValue, E> {
                Err(wrong())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<SecretValue, E> {
                Err(wrong())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<SecretValue, E> {
                Err(wrong())
            }
            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<SecretValue, E> {
                Err(wrong())
            }
            fn visit_unit<E: de::Error>(self) -> Result<SecretValue, E> {
                Err(wrong())
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<SecretValue, A::Error> {
                Err(wrong())
            }
            fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<SecretValue, A::Error> {
                Err(wrong())
            }
        }
        d.deserialize_any(V)
    }
}

/// Checks a secret value (from the config, the environment or a file) without ever putting
/// it in the message: non-empty, at most [`SECRET_VALUE_MAX_BYTES`], and no control character
/// but tab (a CR or LF would split the request it is put into).
pub fn check_secret_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > SECRET_VALUE_MAX_BYTES {
        return Err(format!(
            "is {} bytes; at most {SECRET_VALUE_MAX_BYTES} are accepted",
            value.len()
        ));
    }
    if let Some(pos) = value
        .bytes()
        .position(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
    {
        return Err(format!(
            "holds a control character (byte {} of the value is 0x{:02x}); a secret may hold \
             printable text and tabs only (CR or LF would split the request it is put into)",
            pos + 1,
            value.as_bytes()[pos]
        ));
    }
    Ok(())
}

/// A part of an HTTP request where a placeholder may be replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubstitutePart {
    /// Header values (Basic credentials decoded and re-encoded).
    Headers,
    /// The query string of the request target (the value is percent-encoded).
    Query,
    /// The body (Content-Length or chunked).
    Body,
}

impl FromStr for SubstitutePart {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "headers" => Ok(SubstitutePart::Headers),
            "query" => Ok(SubstitutePart::Query),
            "body" => Ok(SubstitutePart::Body),
            _ => Err(format!(
                "unknown request part `{s}`; expected headers, query or body"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for SubstitutePart {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// `NAME` is a portable environment variable name: a letter or `_`, then letters, digits, `_`.
fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A placeholder holds only the characters a URL never needs to escape (RFC 3986 unreserved:
/// letters, digits, `-`, `.`, `_`, `~`), so it reads the same in a header, a query string and
/// a shell, and no encoding step hides it.
fn is_placeholder_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The gateway DNS service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Upstreams: `IP`, `IP:PORT`, `HOST`, `HOST:PORT` (`[v6]:PORT`). Empty = /etc/resolv.conf.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Per-query timeout; default 5000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_timeout_ms: Option<u64>,
    /// Remove private/loopback/link-local/metadata answers; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebind_protection: Option<bool>,
    /// Answer allowed port-53 traffic to any address with the gateway's service; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intercept_all: Option<bool>,
    /// Names answered locally with the gateway addresses; default `host.microsandbox.internal`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_aliases: Vec<String>,
    /// Queries in flight per guest; default 256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queries_in_flight: Option<usize>,
}

/// Transparent TLS interception. Present in a config file = enabled, unless `enabled = false`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Domains (or `*.suffix`) passed through without interception.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bypass: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_upstream: Option<bool>,
    /// TCP ports where TLS is intercepted; default [443].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intercepted_ports: Option<Vec<u16>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_quic: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_key: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cn: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstream_ca_certs: Vec<PathBuf>,
    /// netfence: relay a connection without SNI (or not TLS) on an intercepted port
    /// unintercepted where the policy allows its address; default false (closed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_no_sni: Option<bool>,
}

impl TlsConfig {
    /// Whether interception is on: `enabled`, which a `tls` table in a file sets to true.
    pub fn is_enabled(&self) -> bool {
        self.enabled.unwrap_or(false)
    }

    /// The keys set here that only interception uses, so have no effect while it is off
    /// (`intercepted_ports` is read by the SNI check either way).
    pub fn interception_only_keys(&self) -> Vec<&'static str> {
        let set = [
            ("bypass", !self.bypass.is_empty()),
            ("verify_upstream", self.verify_upstream.is_some()),
            ("block_quic", self.block_quic.is_some()),
            ("ca_cert", self.ca_cert.is_some()),
            ("ca_key", self.ca_key.is_some()),
            ("ca_cn", self.ca_cn.is_some()),
            ("upstream_ca_certs", !self.upstream_ca_certs.is_empty()),
            ("allow_no_sni", self.allow_no_sni.is_some()),
        ];
        set.iter().filter(|(_, on)| *on).map(|(k, _)| *k).collect()
    }
}

fn tls_present<'de, D: Deserializer<'de>>(d: D) -> Result<TlsConfig, D::Error> {
    let mut t = TlsConfig::deserialize(d)?;
    t.enabled.get_or_insert(true);
    Ok(t)
}

fn pool4<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv4Net>, D::Error> {
    let s = String::deserialize(d)?;
    match s.parse::<Ipv4Net>() {
        Ok(n) => Ok(Some(n)),
        Err(_) => Err(de::Error::custom(format!(
            "`{s}` is not an IPv4 CIDR; expected e.g. 172.16.0.0/12"
        ))),
    }
}

fn pool6<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv6Net>, D::Error> {
    let s = String::deserialize(d)?;
    match s.parse::<Ipv6Net>() {
        Ok(n) => Ok(Some(n)),
        Err(_) => Err(de::Error::custom(format!(
            "`{s}` is not an IPv6 CIDR; expected e.g. fd42:6d73:62::/48"
        ))),
    }
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

/// The whole network configuration (the reference's `Network`, plus netfence's `map` and
/// `deny_action`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Preset name or `{ default_egress, default_ingress, rules }`. Unset and no rules anywhere
    /// = `public-only`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicySpec>,
    /// Custom rules; they follow the preset's rules and the `policy` table's rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSpec>,
    /// Published ports.
    #[serde(
        default,
        with = "publish::entries",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<PublishSpec>,
    /// Exact names whose resolution and flows are denied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_domains: Vec<String>,
    /// Suffixes (`.ads`) whose apex and subdomains are denied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_domain_suffixes: Vec<String>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub dns: DnsConfig,
    /// Legacy form of `dns.rebind_protection`; the nested value wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_rebind_protection: Option<bool>,
    #[serde(
        default,
        deserialize_with = "tls_present",
        skip_serializing_if = "is_default"
    )]
    pub tls: TlsConfig,
    /// Pool for per-guest /30 subnets; default 172.16.0.0/12.
    #[serde(
        default,
        deserialize_with = "pool4",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_pool: Option<Ipv4Net>,
    /// Pool for per-guest /64 prefixes; default fd42:6d73:62::/48.
    #[serde(
        default,
        deserialize_with = "pool6",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv6_pool: Option<Ipv6Net>,
    /// Cap on concurrent flows from the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_secret_violation: Option<ViolationAction>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_host_cas: Option<bool>,
    /// netfence: guest-visible destination -> host-side address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub map: Vec<AddressMapEntry>,
    /// netfence: what a denied flow gets.
    #[serde(default, skip_serializing_if = "is_default")]
    pub deny_action: DenyAction,
}

/// The policy part of a config with everything implicit made explicit: the preset in force,
/// the defaults, and the custom rules in order (policy table rules, then top-level rules).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EffectivePolicy {
    pub preset: Option<Preset>,
    /// Whether the preset came from the "nothing configured" default.
    pub implicit_preset: bool,
    pub default_egress: Action,
    pub default_ingress: Action,
    /// Whether each default was set explicitly (rather than taken from the preset or model).
    pub explicit_egress: bool,
    pub explicit_ingress: bool,
    pub rules: Vec<RuleSpec>,
}

impl NetworkConfig {
    /// The policy with presets and defaults resolved (preset rules not yet expanded).
    pub fn effective_policy(&self) -> EffectivePolicy {
        let (preset, de, di, mut rules) = match &self.policy {
            Some(PolicySpec::Preset(p)) => (Some(*p), None, None, Vec::new()),
            Some(PolicySpec::Table(t)) => (
                t.preset,
                t.default_egress,
                t.default_ingress,
                t.rules.clone(),
            ),
            None => (None, None, None, Vec::new()),
        };
        rules.extend(self.rules.iter().cloned());
        let implicit = self.policy.is_none() && self.rules.is_empty();
        let preset = if implicit {
            Some(Preset::PublicOnly)
        } else {
            preset
        };
        let (pe, pi) = match preset {
            Some(Preset::None) => (Action::Deny, Action::Deny),
            Some(Preset::AllowAll) => (Action::Allow, Action::Allow),
            _ => (Action::Deny, Action::Allow),
        };
        EffectivePolicy {
            preset,
            implicit_preset: implicit,
            default_egress: de.unwrap_or(pe),
            default_ingress: di.unwrap_or(pi),
            explicit_egress: de.is_some(),
            explicit_ingress: di.is_some(),
            rules,
        }
    }

    /// Validates the config and compiles its policy. `host` are the gateway addresses (and how
    /// the host's own addresses are recognised): the `host` group.
    pub fn compile_policy(&self, host: &HostAddrs) -> Result<Policy, ConfigError> {
        self.validate()?;
        let eff = self.effective_policy();
        let parts = PolicyParts {
            preset: eff.preset,
            default_egress: eff.default_egress,
            default_ingress: eff.default_ingress,
            preset_egress_default: eff.preset.is_some() && !eff.explicit_egress,
            preset_ingress_default: eff.preset.is_some() && !eff.explicit_ingress,
            rules: eff.rules,
            deny_domains: self.deny_domains.clone(),
            deny_suffixes: self
                .deny_domain_suffixes
                .iter()
                .map(|d| strip_suffix_marker(d).to_string())
                .collect(),
            deny_action: self.deny_action,
            max_connections: self.max_connections,
        };
        Ok(Policy::new(parts, host))
    }

    /// The IPv4 pool, default 172.16.0.0/12.
    pub fn ipv4_pool_or_default(&self) -> Ipv4Net {
        self.ipv4_pool.unwrap_or_else(|| {
            Ipv4Net::new(std::net::Ipv4Addr::new(172, 16, 0, 0), 12).expect("valid")
        })
    }

    /// The IPv6 pool, default fd42:6d73:62::/48.
    pub fn ipv6_pool_or_default(&self) -> Ipv6Net {
        self.ipv6_pool.unwrap_or_else(|| {
            Ipv6Net::new(
                std::net::Ipv6Addr::new(0xfd42, 0x6d73, 0x62, 0, 0, 0, 0, 0),
                48,
            )
            .expect("valid")
        })
    }

    /// The gateway addresses of guest slot `slot` (the `host` group): the first address of
    /// the slot's /30 in `ipv4_pool` (base + 4*slot + 1), `::1` of the slot's /64 in
    /// `ipv6_pool`, and the gateway's link-local fe80::1. A family is empty when the slot lies
    /// outside its pool.
    pub fn gateway_addrs(&self, slot: u32) -> HostAddrs {
        let mut h = HostAddrs::default();
        if let Ok(a) = addressing::LinkAddrs::for_slot(self.ipv4_pool_or_default(), slot) {
            h.ipv4.push(a.gateway);
        }
        if let Ok(a) = addressing::LinkAddrs6::for_slot(self.ipv6_pool_or_default(), slot) {
            h.ipv6.push(a.gateway);
            h.ipv6.push(a.link_local);
        }
        h
    }

    /// `on_secret_violation`, else `block_and_log`.
    pub fn secret_violation_action(&self) -> ViolationAction {
        self.on_secret_violation.unwrap_or_default()
    }

    /// `dns.rebind_protection`, else the legacy `dns_rebind_protection`, else true.
    pub fn rebind_protection(&self) -> bool {
        self.dns
            .rebind_protection
            .or(self.dns_rebind_protection)
            .unwrap_or(true)
    }

    /// Checks everything the types cannot. The first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(PolicySpec::Table(t)) = &self.policy {
            for (i, r) in t.rules.iter().enumerate() {
                validate_rule(r, &format!("policy.rules[{i}]"))?;
            }
        }
        for (i, r) in self.rules.iter().enumerate() {
            validate_rule(r, &format!("rules[{i}]"))?;
        }
        for (i, p) in self.ports.iter().enumerate() {
            if let Some(e) = p.problem() {
                return Err(ConfigError::new(
                    format!("ports[{i}]"),
                    Some(p.to_string()),
                    e,
                ));
            }
            if let Some(j) = self.ports[..i].iter().position(|q| {
                q.host_port == p.host_port
                    && q.protocol == p.protocol
                    && binds_overlap(q.bind, p.bind)
            }) {
                return Err(ConfigError::new(
                    format!("ports[{i}]"),
                    Some(p.to_string()),
                    format!(
                        "host port {}/{} is already published by ports[{j}]; each host port can be bound once",
                        p.host_port, p.protocol
                    ),
                ));
            }
        }
        for (i, d) in self.deny_domains.iter().enumerate() {
            parse_domain(d).map_err(|e| {
                ConfigError::new(
                    format!("deny_domains[{i}]"),
                    Some(d.clone()),
                    format!("{e}; expected a domain name like ads.example.com"),
                )
            })?;
        }
        for (i, d) in self.deny_domain_suffixes.iter().enumerate() {
            parse_domain(strip_suffix_marker(d)).map_err(|e| {
                ConfigError::new(
                    format!("deny_domain_suffixes[{i}]"),
                    Some(d.clone()),
                    format!("{e}; expected a suffix like .ads.example or ads.example"),
                )
            })?;
        }
        for (i, ns) in self.dns.nameservers.iter().enumerate() {
            if let Err(e) = check_nameserver(ns) {
                return Err(ConfigError::new(
                    format!("dns.nameservers[{i}]"),
                    Some(ns.clone()),
                    e,
                ));
            }
        }
        if self.dns.query_timeout_ms == Some(0) {
            return Err(ConfigError::new(
                "dns.query_timeout_ms",
                Some("0".into()),
                "must be at least 1 (milliseconds); default 5000",
            ));
        }
        if self.dns.max_queries_in_flight == Some(0) {
            return Err(ConfigError::new(
                "dns.max_queries_in_flight",
                Some("0".into()),
                "must be at least 1; default 256",
            ));
        }
        for (i, a) in self.dns.host_aliases.iter().enumerate() {
            parse_domain(a).map_err(|e| {
                ConfigError::new(
                    format!("dns.host_aliases[{i}]"),
                    Some(a.clone()),
                    format!("{e}; expected a domain name"),
                )
            })?;
        }
        for (i, b) in self.tls.bypass.iter().enumerate() {
            parse_domain(strip_suffix_marker(b)).map_err(|e| {
                ConfigError::new(
                    format!("tls.bypass[{i}]"),
                    Some(b.clone()),
                    format!("{e}; expected a domain or *.suffix pattern"),
                )
            })?;
        }
        if let Some(ports) = &self.tls.intercepted_ports {
            for (i, p) in ports.iter().enumerate() {
                if *p == 0 {
                    return Err(ConfigError::new(
                        format!("tls.intercepted_ports[{i}]"),
                        Some("0".into()),
                        "port 0 is not allowed; expected 1-65535",
                    ));
                }
            }
        }
        if self.tls.ca_cert.is_some() != self.tls.ca_key.is_some() {
            let (set, missing) = if self.tls.ca_cert.is_some() {
                ("tls.ca_cert", "tls.ca_key")
            } else {
                ("tls.ca_key", "tls.ca_cert")
            };
            return Err(ConfigError::new(missing, None, format!("{set} is set, so {missing} must be set too (a CA needs its certificate and its key)")));
        }
        if let Some(cn) = &self.tls.ca_cn {
            check_ca_common_name(cn).map_err(|e| {
                ConfigError::new(
                    "tls.ca_cn",
                    Some(cn.clone()),
                    format!("{e}; expected the common name of the generated CA"),
                )
            })?;
            if self.tls.ca_cert.is_some() {
                return Err(ConfigError::new(
                    "tls.ca_cn",
                    Some(cn.clone()),
                    "names a generated CA, but tls.ca_cert loads one (whose name is in its \
                     certificate); remove tls.ca_cn",
                ));
            }
        }
        if let Some(net) = self.ipv4_pool {
            if net.trunc() != net {
                return Err(ConfigError::new(
                    "ipv4_pool",
                    Some(net.to_string()),
                    format!("host bits set; did you mean {}?", net.trunc()),
                ));
            }
            if net.prefix_len() > 30 {
                return Err(ConfigError::new(
                    "ipv4_pool",
                    Some(net.to_string()),
                    "prefix too long: the pool must hold at least one /30 (prefix 0-30)",
                ));
            }
        }
        if let Some(net) = self.ipv6_pool {
            if net.trunc() != net {
                return Err(ConfigError::new(
                    "ipv6_pool",
                    Some(net.to_string()),
                    format!("host bits set; did you mean {}?", net.trunc()),
                ));
            }
            if net.prefix_len() > 64 {
                return Err(ConfigError::new(
                    "ipv6_pool",
                    Some(net.to_string()),
                    "prefix too long: the pool must hold at least one /64 (prefix 0-64)",
                ));
            }
        }
        if self.max_connections == Some(0) {
            return Err(ConfigError::new(
                "max_connections",
                Some("0".into()),
                "must be at least 1 (omit it for no cap)",
            ));
        }
        self.validate_secrets()?;
        for (i, m) in self.map.iter().enumerate() {
            if let Some(e) = m.problem() {
                return Err(ConfigError::new(
                    format!("map[{i}]"),
                    Some(m.to_string()),
                    e,
                ));
            }
            if let Some(j) = self.map[..i].iter().position(|o| {
                crate::policy::canonical(o.guest) == crate::policy::canonical(m.guest)
                    && o.guest_port == m.guest_port
            }) {
                return Err(ConfigError::new(
                    format!("map[{i}]"),
                    Some(m.to_string()),
                    format!("the same guest destination is already mapped by map[{j}]"),
                ));
            }
        }
        Ok(())
    }
}

impl NetworkConfig {
    /// The `secrets` entries: names, the one source of each value, placeholders that cannot
    /// shadow each other, host patterns, parts. Values read from the environment or a file are
    /// checked when they are read ([`crate::secrets::SecretSet::load`]); no message ever holds
    /// a value.
    fn validate_secrets(&self) -> Result<(), ConfigError> {
        let mut placeholders: Vec<String> = Vec::with_capacity(self.secrets.len());
        for (i, s) in self.secrets.iter().enumerate() {
            let field = |f: &str| format!("secrets[{i}].{f}");
            if !is_env_name(&s.env_var) || s.env_var.len() > ENV_VAR_MAX_LEN {
                return Err(ConfigError::new(
                    field("env_var"),
                    Some(s.env_var.clone()),
                    format!(
                        "expected an environment variable name: a letter or `_`, then letters, \
                         digits or `_`, at most {ENV_VAR_MAX_LEN} characters"
                    ),
                ));
            }
            if let Some(j) = self.secrets[..i]
                .iter()
                .position(|o| o.env_var == s.env_var)
            {
                return Err(ConfigError::new(
                    field("env_var"),
                    Some(s.env_var.clone()),
                    format!("secrets[{j}] already uses this name; each secret needs its own"),
                ));
            }
            let sources = [
                s.value.as_ref().map(|_| "value"),
                s.value_env.as_ref().map(|_| "value_env"),
                s.value_file.as_ref().map(|_| "value_file"),
            ];
            let given: Vec<&str> = sources.into_iter().flatten().collect();
            if given.len() != 1 {
                return Err(ConfigError::new(
                    format!("secrets[{i}]"),
                    None,
                    format!(
                        "{}; set exactly one of value, value_env (an environment variable of \
                         netfence) or value_file (a file)",
                        if given.is_empty() {
                            "no value is given".to_string()
                        } else {
                            format!("{} are set", given.join(" and "))
                        }
                    ),
                ));
            }
            if let Some(v) = &s.value {
                check_secret_value(v.expose())
                    .map_err(|e| ConfigError::new(field("value"), None, e))?;
            }
            if let Some(name) = &s.value_env {
                if !is_env_name(name) {
                    return Err(ConfigError::new(
                        field("value_env"),
                        Some(name.clone()),
                        "expected the name of an environment variable of netfence's own \
                         process: a letter or `_`, then letters, digits or `_`",
                    ));
                }
            }
            if let Some(path) = &s.value_file {
                if path.as_os_str().is_empty() {
                    return Err(ConfigError::new(
                        field("value_file"),
                        Some(String::new()),
                        "expected the path of a file that holds the value",
                    ));
                }
            }
            let placeholder = s.effective_placeholder();
            let shown = || Some(placeholder.clone());
            if !PLACEHOLDER_LEN.contains(&placeholder.len()) {
                return Err(ConfigError::new(
                    field("placeholder"),
                    shown(),
                    format!(
                        "is {} bytes; a placeholder must be {}-{} bytes, long enough never to \
                         occur in traffic by accident (omit it for the derived default)",
                        placeholder.len(),
                        PLACEHOLDER_LEN.start(),
                        PLACEHOLDER_LEN.end()
                    ),
                ));
            }
            if !placeholder.bytes().all(is_placeholder_char) {
                return Err(ConfigError::new(
                    field("placeholder"),
                    shown(),
                    "may hold only letters, digits, `-`, `.`, `_` and `~` (characters that \
                     no URL, header or shell changes)",
                ));
            }
            if let Some(j) = placeholders
                .iter()
                .position(|p| p.contains(placeholder.as_str()) || placeholder.contains(p.as_str()))
            {
                return Err(ConfigError::new(
                    field("placeholder"),
                    shown(),
                    format!(
                        "overlaps the placeholder of secrets[{j}] (`{}`): no placeholder may \
                         contain another, or one would hide the other",
                        placeholders[j]
                    ),
                ));
            }
            placeholders.push(placeholder);
            if s.allowed_hosts.is_empty() {
                return Err(ConfigError::new(
                    field("allowed_hosts"),
                    None,
                    "is empty; a secret is substituted only for these hosts, so name at least \
                     one (api.example.com or *.example.com)",
                ));
            }
            for (j, h) in s.allowed_hosts.iter().enumerate() {
                parse_domain(strip_suffix_marker(h)).map_err(|e| {
                    ConfigError::new(
                        format!("secrets[{i}].allowed_hosts[{j}]"),
                        Some(h.clone()),
                        format!("{e}; expected a domain or *.suffix pattern"),
                    )
                })?;
            }
            if s.substitute_in.as_ref().is_some_and(|p| p.is_empty()) {
                return Err(ConfigError::new(
                    field("substitute_in"),
                    Some("[]".into()),
                    "names no part; expected a non-empty subset of [\"headers\", \"query\", \
                     \"body\"] (default [\"headers\"])",
                ));
            }
        }
        Ok(())
    }
}

fn binds_overlap(a: IpAddr, b: IpAddr) -> bool {
    a == b
        || (a.is_unspecified() && a.is_ipv4() == b.is_ipv4())
        || (b.is_unspecified() && a.is_ipv4() == b.is_ipv4())
}

/// The longest common name X.509 allows (RFC 5280 `ub-common-name`).
pub const MAX_CA_CN_LEN: usize = 64;

/// Checks the common name of a generated CA (`tls.ca_cn`, `netfence ca generate --cn`): 1 to
/// [`MAX_CA_CN_LEN`] characters, not only spaces, no control characters.
pub fn check_ca_common_name(cn: &str) -> Result<(), String> {
    if cn.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if cn.chars().count() > MAX_CA_CN_LEN {
        return Err(format!(
            "longer than {MAX_CA_CN_LEN} characters (X.509's limit)"
        ));
    }
    if cn.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// `.example.com` and `*.example.com` -> `example.com`.
pub(crate) fn strip_suffix_marker(s: &str) -> &str {
    s.strip_prefix("*.")
        .or_else(|| s.strip_prefix('.'))
        .unwrap_or(s)
}

fn check_nameserver(ns: &str) -> Result<(), String> {
    const WHAT: &str = "expected IP, IP:PORT, HOST or HOST:PORT ([v6]:PORT for IPv6 with a port)";
    let port_ok = |p: &str| matches!(p.parse::<u32>(), Ok(1..=65535));
    if ns.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if let Some(inner) = ns.strip_prefix('[') {
        return match inner.split_once("]:") {
            Some((a, p)) if a.parse::<std::net::Ipv6Addr>().is_ok() && port_ok(p) => Ok(()),
            _ => Err(WHAT.into()),
        };
    }
    let (host, port) = match ns.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (ns, None),
    };
    if let Some(p) = port {
        if !port_ok(p) {
            return Err(format!("port `{p}` is not 1-65535; {WHAT}"));
        }
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Ok(());
    }
    // A single-label host (e.g. `resolver`) is allowed here: the host resolver decides.
    let as_domain = if host.contains('.') {
        host.to_string()
    } else {
        format!("{host}.x")
    };
    parse_domain(&as_domain)
        .map(|_| ())
        .map_err(|e| format!("{e}; {WHAT}"))
}

fn validate_rule(r: &RuleSpec, path: &str) -> Result<(), ConfigError> {
    if r.direction == RuleDirection::Ingress || r.direction == RuleDirection::Any {
        if let Some(p) = r.all_protocols().into_iter().find(|p| p.is_icmp()) {
            let field = if r.protocol == Some(p) {
                format!("{path}.protocol")
            } else {
                let i = r.protocols.iter().position(|x| *x == p).unwrap_or(0);
                format!("{path}.protocols[{i}]")
            };
            return Err(ConfigError::new(
                field,
                Some(p.name().to_string()),
                format!(
                    "ICMP is not allowed in a rule with direction `{}`: the host has no inbound ICMP path; \
                     use direction = \"egress\" for ICMP rules",
                    r.direction
                ),
            ));
        }
    }
    let ports = r.port.iter().map(|p| (format!("{path}.port"), p)).chain(
        r.ports
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("{path}.ports[{i}]"), p)),
    );
    for (field, p) in ports {
        if let Some(e) = p.problem() {
            return Err(ConfigError::new(
                field,
                Some(format!("{}-{}", p.start, p.end)),
                e,
            ));
        }
    }
    if let Some(d) = &r.destination {
        let bad = match d {
            Destination::Cidr(net) if net.trunc() != *net => {
                Some(format!("host bits set; did you mean {}?", net.trunc()))
            }
            Destination::Domain(n) => parse_domain(n).err(),
            Destination::Suffix(n) => parse_domain(n).err(),
            _ => None,
        };
        if let Some(e) = bad {
            return Err(ConfigError::new(
                format!("{path}.destination"),
                Some(d.to_string()),
                e,
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Format of a config file, by extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
}

impl Format {
    pub fn of(path: &Path) -> Result<Format, ConfigError> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
        {
            Some(e) if e == "toml" => Ok(Format::Toml),
            Some(e) if e == "json" => Ok(Format::Json),
            other => Err(ConfigError::new(
                "--config",
                Some(path.display().to_string()),
                format!(
                    "unknown config file extension {}; expected .toml or .json",
                    other
                        .map(|e| format!("`.{e}`"))
                        .unwrap_or_else(|| "(none)".into())
                ),
            )),
        }
    }
}

/// Parses config text. Errors carry the field path; the caller adds the file.
pub fn parse_str(text: &str, format: Format) -> Result<NetworkConfig, ConfigError> {
    match format {
        Format::Toml => {
            let de = toml::Deserializer::new(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let mut msg = inner.message().to_string();
                if let Some(span) = inner.span() {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    msg = format!("{msg} (line {line})");
                }
                ConfigError::new(clean_path(path), None, msg)
            })
        }
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(text);
            let r: Result<NetworkConfig, _> = serde_path_to_error::deserialize(&mut de);
            let cfg = r.map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                ConfigError::new(clean_path(path), None, inner.to_string())
            })?;
            de.end()
                .map_err(|e| ConfigError::new("", None, e.to_string()))?;
            Ok(cfg)
        }
    }
}

fn clean_path(p: String) -> String {
    if p == "." || p == "?" {
        String::new()
    } else {
        p
    }
}

/// Reads, parses and validates a config file (TOML or JSON by extension).
pub fn load(path: &Path) -> Result<NetworkConfig, ConfigError> {
    let cfg = load_unvalidated(path)?;
    cfg.validate().map_err(|e| e.in_file(path))?;
    Ok(cfg)
}

/// Reads and parses a config file without [`NetworkConfig::validate`].
pub fn load_unvalidated(path: &Path) -> Result<NetworkConfig, ConfigError> {
    let format = Format::of(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            "--config",
            Some(path.display().to_string()),
            format!("cannot read the file: {e}"),
        )
    })?;
    parse_str(&text, format).map_err(|e| e.in_file(path))
}

/// Renders a config as TOML (for `netfence config`).
pub fn to_toml(cfg: &NetworkConfig) -> String {
    toml::to_string_pretty(cfg).unwrap_or_else(|e| format!("# cannot render as TOML: {e}\n"))
}
