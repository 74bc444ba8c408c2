//! The secrets of one netfence process: each secret's placeholder, value (memory only, zeroed
//! on drop), allowed hosts, parts and violation action, and one automaton that finds every
//! placeholder in a byte stream fed in pieces.
//!
//! The automaton is an Aho-Corasick NFA with standard match semantics, stepped one byte at a
//! time with its state kept between pieces, so a placeholder split anywhere is found in O(1)
//! per byte with no copy. A match is reported at its last byte and the state goes on from
//! there, so placeholders that overlap (one ending as another begins, which the config allows)
//! are each found; since the config forbids a placeholder inside another, at most one ends at
//! any byte. The matches depend on the bytes only, never on where the stream is cut.

use std::ffi::OsString;
use std::fmt;
use std::path::Path;

use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::nfa::contiguous::NFA;
use aho_corasick::{Anchored, MatchKind};
use zeroize::Zeroizing;

use super::{printable, HostContext, SubstitutePart, ViolationAction};
use crate::config::{check_secret_value, ConfigError, NetworkConfig, SecretEntry};
use crate::dns::names::{is_within, normalize_name};

/// An `allowed_hosts` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
enum HostPattern {
    /// `api.example.com`: that name only.
    Exact(String),
    /// `*.example.com` (or `.example.com`): any name below example.com, not example.com itself.
    Below(String),
}

impl HostPattern {
    fn parse(entry: &str) -> HostPattern {
        match entry.strip_prefix("*.").or_else(|| entry.strip_prefix('.')) {
            Some(suffix) => HostPattern::Below(normalize_name(suffix)),
            None => HostPattern::Exact(normalize_name(entry)),
        }
    }

    /// `name` must be normalized.
    fn matches(&self, name: &str) -> bool {
        match self {
            HostPattern::Exact(n) => n == name,
            HostPattern::Below(suffix) => name != suffix && is_within(name, suffix),
        }
    }
}

/// One secret as the datapath uses it.
pub(crate) struct Secret {
    pub(crate) env_var: String,
    pub(crate) placeholder: String,
    /// The value, as put into headers and bodies.
    pub(crate) value: Zeroizing<Vec<u8>>,
    /// The value percent-encoded (everything but RFC 3986 unreserved), as put into a query.
    pub(crate) value_query: Zeroizing<Vec<u8>>,
    allowed: Vec<HostPattern>,
    parts: Vec<SubstitutePart>,
    pub(crate) action: ViolationAction,
}

impl Secret {
    /// Whether `name` (normalized) is in `allowed_hosts`.
    pub(crate) fn allows(&self, name: &str) -> bool {
        self.allowed.iter().any(|p| p.matches(name))
    }

    /// Whether the placeholder is replaced in `part`.
    pub(crate) fn substitutes_in(&self, part: SubstitutePart) -> bool {
        self.parts.contains(&part)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("env_var", &self.env_var)
            .field("placeholder", &self.placeholder)
            .field("value", &crate::config::REDACTED)
            .field("allowed", &self.allowed)
            .field("parts", &self.parts)
            .field("action", &self.action)
            .finish()
    }
}

/// All secrets of a config, ready for the datapath. Share it between flows with an `Arc`.
pub struct SecretSet {
    secrets: Vec<Secret>,
    /// `None` when there are no secrets.
    automaton: Option<NFA>,
    longest: usize,
}

impl fmt::Debug for SecretSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretSet")
            .field("secrets", &self.secrets)
            .finish_non_exhaustive()
    }
}

/// A state of the placeholder automaton, carried between pieces of one stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ScanState(Option<StateID>);

/// One placeholder found in a buffer: `start..end`, and the secret's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Found {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) secret: usize,
}

impl SecretSet {
    /// Builds the set from a config, reading `value_env` from netfence's environment and
    /// `value_file` from disk now. Errors name the field (never the value); exit 2.
    pub fn load(cfg: &NetworkConfig) -> Result<SecretSet, ConfigError> {
        Self::load_with(cfg, &|name| std::env::var_os(name))
    }

    /// [`SecretSet::load`] with the environment given as a lookup.
    pub fn load_with(
        cfg: &NetworkConfig,
        env: &dyn Fn(&str) -> Option<OsString>,
    ) -> Result<SecretSet, ConfigError> {
        cfg.validate()?;
        let default_action = cfg.secret_violation_action();
        let mut secrets = Vec::with_capacity(cfg.secrets.len());
        for (i, entry) in cfg.secrets.iter().enumerate() {
            let value = read_value(i, entry, env)?;
            let placeholder = entry.effective_placeholder();
            if value.is_empty() {
                return Err(ConfigError::new(
                    format!("secrets[{i}]"),
                    None,
                    "the value is empty",
                ));
            }
            // A short value may occur in a hash by chance; a long one there was put there.
            if placeholder == *value || (value.len() >= 8 && placeholder.contains(value.as_str())) {
                return Err(ConfigError::new(
                    format!("secrets[{i}].placeholder"),
                    Some(placeholder),
                    "contains the secret's value: the guest would see the value",
                ));
            }
            let value_query = Zeroizing::new(percent_encode(value.as_bytes()));
            secrets.push(Secret {
                env_var: entry.env_var.clone(),
                placeholder,
                value: Zeroizing::new(value.as_bytes().to_vec()),
                value_query,
                allowed: entry
                    .allowed_hosts
                    .iter()
                    .map(|h| HostPattern::parse(h))
                    .collect(),
                parts: entry.effective_substitute_in(),
                action: entry.on_violation.unwrap_or(default_action),
            });
        }
        Self::from_secrets(secrets)
    }

    fn from_secrets(secrets: Vec<Secret>) -> Result<SecretSet, ConfigError> {
        let longest = secrets
            .iter()
            .map(|s| s.placeholder.len())
            .max()
            .unwrap_or(0);
        let automaton = if secrets.is_empty() {
            None
        } else {
            let nfa = NFA::builder()
                .match_kind(MatchKind::Standard)
                .build(secrets.iter().map(|s| s.placeholder.as_bytes()))
                .map_err(|e| {
                    ConfigError::new(
                        "secrets",
                        None,
                        format!("cannot build the placeholder matcher: {e}"),
                    )
                })?;
            Some(nfa)
        };
        Ok(SecretSet {
            secrets,
            automaton,
            longest,
        })
    }

    /// No secrets: flows need no secrets stage.
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    /// The `(env_var, placeholder)` of each secret, in config order.
    pub fn placeholders(&self) -> impl Iterator<Item = (&str, &str)> {
        self.secrets
            .iter()
            .map(|s| (s.env_var.as_str(), s.placeholder.as_str()))
    }

    /// The longest placeholder's length: a substituting stage holds back one byte less.
    pub fn longest_placeholder(&self) -> usize {
        self.longest
    }

    pub(crate) fn secret(&self, i: usize) -> &Secret {
        &self.secrets[i]
    }

    /// The state at the start of a stream.
    pub(crate) fn start(&self) -> ScanState {
        ScanState(
            self.automaton
                .as_ref()
                .and_then(|a| a.start_state(Anchored::No).ok()),
        )
    }

    /// Feeds one byte; returns the secret whose placeholder ends with it, if any. The state
    /// is kept, so a placeholder that began inside this one is found too.
    #[inline]
    pub(crate) fn step(&self, state: &mut ScanState, byte: u8) -> Option<usize> {
        let (Some(a), Some(sid)) = (self.automaton.as_ref(), state.0) else {
            return None;
        };
        let next = a.next_state(Anchored::No, sid, byte);
        state.0 = Some(next);
        (a.is_special(next) && a.is_match(next)).then(|| a.match_pattern(next, 0).as_usize())
    }

    /// Every placeholder in a whole buffer, in the order they end (two may overlap).
    pub(crate) fn find_all(&self, hay: &[u8]) -> Vec<Found> {
        let mut state = self.start();
        let mut found = Vec::new();
        for (i, &b) in hay.iter().enumerate() {
            if let Some(secret) = self.step(&mut state, b) {
                let len = self.secrets[secret].placeholder.len();
                found.push(Found {
                    start: i + 1 - len,
                    end: i + 1,
                    secret,
                });
            }
        }
        found
    }

    /// For a stream not parsed as HTTP: whether each secret's placeholder may pass (a name the
    /// guest resolved for the destination, or a verified SNI, is in its `allowed_hosts`).
    pub(crate) fn raw_allowed(&self, ctx: &HostContext) -> Vec<bool> {
        let names: Vec<String> = ctx
            .resolved_names
            .iter()
            .map(|n| normalize_name(n))
            .chain(
                ctx.sni
                    .iter()
                    .filter(|_| ctx.sni_verified)
                    .map(|n| normalize_name(n)),
            )
            .collect();
        self.secrets
            .iter()
            .map(|s| names.iter().any(|n| s.allows(n)))
            .collect()
    }
}

/// The name a violation on a connection without a request host shows: the SNI, else the first
/// resolved name, else nothing.
pub(crate) fn context_host(ctx: &HostContext) -> String {
    ctx.sni
        .as_deref()
        .or(ctx.resolved_names.first().map(String::as_str))
        .map(|n| printable(n.as_bytes()))
        .unwrap_or_default()
}

/// Reads one secret's value from its one source. No message holds the value.
fn read_value(
    i: usize,
    entry: &SecretEntry,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<Zeroizing<String>, ConfigError> {
    let (field, value) = if let Some(v) = &entry.value {
        ("value", Zeroizing::new(v.expose().to_string()))
    } else if let Some(name) = &entry.value_env {
        let field = format!("secrets[{i}].value_env");
        let raw = env(name).ok_or_else(|| {
            ConfigError::new(
                field.clone(),
                Some(name.clone()),
                "this environment variable is not set in netfence's environment",
            )
        })?;
        let value = raw.into_string().map_err(|_| {
            ConfigError::new(
                field.clone(),
                Some(name.clone()),
                "this environment variable does not hold UTF-8 text",
            )
        })?;
        ("value_env", Zeroizing::new(value))
    } else if let Some(path) = &entry.value_file {
        ("value_file", read_value_file(i, path)?)
    } else {
        return Err(ConfigError::new(
            format!("secrets[{i}]"),
            None,
            "no value is given; set exactly one of value, value_env or value_file",
        ));
    };
    check_secret_value(&value).map_err(|e| {
        let shown = match field {
            "value_env" => entry.value_env.clone(),
            "value_file" => entry.value_file.as_ref().map(|p| p.display().to_string()),
            _ => None,
        };
        ConfigError::new(
            format!("secrets[{i}].{field}"),
            shown,
            format!("the value {e}"),
        )
    })?;
    Ok(value)
}

/// A value file: UTF-8 text; one trailing `\n` (or `\r\n`) is not part of the value.
fn read_value_file(i: usize, path: &Path) -> Result<Zeroizing<String>, ConfigError> {
    let field = format!("secrets[{i}].value_file");
    let shown = Some(path.display().to_string());
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
        ConfigError::new(
            field.clone(),
            shown.clone(),
            format!("cannot read the file: {e}"),
        )
    })?);
    let mut text = match std::str::from_utf8(&bytes) {
        Ok(t) => Zeroizing::new(t.to_string()),
        Err(_) => {
            return Err(ConfigError::new(
                field,
                shown,
                "the file does not hold UTF-8 text",
            ))
        }
    };
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

/// Percent-encodes every byte outside RFC 3986 unreserved, so a value lands in a query string
/// as exactly itself once the server decodes it.
fn percent_encode(value: &[u8]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(value.len() * 3);
    for &b in value {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_str, Format};

    fn cfg(text: &str) -> NetworkConfig {
        parse_str(text, Format::Toml).unwrap()
    }

    #[test]
    fn host_patterns_exact_and_below() {
        let exact = HostPattern::parse("API.Example.com.");
        assert!(exact.matches("api.example.com"));
        assert!(!exact.matches("x.api.example.com"));
        for entry in ["*.example.com", ".example.com"] {
            let below = HostPattern::parse(entry);
            assert!(below.matches("api.example.com"), "{entry}");
            assert!(below.matches("a.b.example.com"), "{entry}");
            assert!(
                !below.matches("example.com"),
                "{entry}: the apex is not below"
            );
            assert!(!below.matches("badexample.com"), "{entry}");
        }
    }

    #[test]
    fn values_come_from_config_env_and_file() {
        let dir = std::env::temp_dir().join(format!("nf-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, "from-file-value\r\n").unwrap();
        let text = format!(
            "[[secrets]]\nenv_var = \"A\"\nvalue = \"inline-value\"\nallowed_hosts = [\"a.example\"]\n\
             [[secrets]]\nenv_var = \"B\"\nvalue_env = \"NF_TEST_B\"\nallowed_hosts = [\"b.example\"]\n\
             [[secrets]]\nenv_var = \"C\"\nvalue_file = \"{}\"\nallowed_hosts = [\"c.example\"]\n",
            file.display()
        );
        let env = |name: &str| (name == "NF_TEST_B").then(|| OsString::from("env-value"));
        let set = SecretSet::load_with(&cfg(&text), &env).unwrap();
        let values: Vec<&[u8]> = set.secrets.iter().map(|s| &s.value[..]).collect();
        assert_eq!(
            values,
            [&b"inline-value"[..], b"env-value", b"from-file-value"]
        );
        let debug = format!("{set:?}");
        for v in ["inline-value", "env-value", "from-file-value"] {
            assert!(!debug.contains(v), "{debug}");
        }
        assert!(debug.contains("<redacted>"), "{debug}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unreadable_sources_are_clear_errors_without_the_value() {
        let none = |_: &str| None;
        let e = SecretSet::load_with(
            &cfg("[[secrets]]\nenv_var = \"A\"\nvalue_env = \"NF_MISSING\"\nallowed_hosts = [\"a.example\"]"),
            &none,
        )
        .unwrap_err();
        assert_eq!(e.field, "secrets[0].value_env");
        assert!(
            e.to_string().contains("NF_MISSING") && e.to_string().contains("not set"),
            "{e}"
        );
        assert_eq!(e.exit_code(), 2);

        let e = SecretSet::load_with(
            &cfg("[[secrets]]\nenv_var = \"A\"\nvalue_file = \"/nonexistent/nf-key\"\nallowed_hosts = [\"a.example\"]"),
            &none,
        )
        .unwrap_err();
        assert_eq!(e.field, "secrets[0].value_file");
        assert!(e.to_string().contains("cannot read the file"), "{e}");

        let bad = |_: &str| Some(OsString::from("line1\nTOPSECRET"));
        let e = SecretSet::load_with(
            &cfg(
                "[[secrets]]\nenv_var = \"A\"\nvalue_env = \"X\"\nallowed_hosts = [\"a.example\"]",
            ),
            &bad,
        )
        .unwrap_err();
        assert!(e.to_string().contains("control character"), "{e}");
        assert!(!e.to_string().contains("TOPSECRET"), "{e}");

        let empty = |_: &str| Some(OsString::from(""));
        let e = SecretSet::load_with(
            &cfg(
                "[[secrets]]\nenv_var = \"A\"\nvalue_env = \"X\"\nallowed_hosts = [\"a.example\"]",
            ),
            &empty,
        )
        .unwrap_err();
        assert!(e.to_string().contains("must not be empty"), "{e}");
    }

    #[test]
    fn a_placeholder_holding_the_value_is_refused() {
        let e = SecretSet::load_with(
            &cfg("[[secrets]]\nenv_var = \"A\"\nvalue = \"abcdefgh\"\nplaceholder = \"xxxxabcdefghxxxxxxxxxxxx\"\nallowed_hosts = [\"a.example\"]"),
            &|_| None,
        )
        .unwrap_err();
        assert_eq!(e.field, "secrets[0].placeholder");
        assert!(
            e.to_string().contains("the guest would see the value"),
            "{e}"
        );
    }

    #[test]
    fn violation_action_per_secret_overrides_the_default() {
        let set = SecretSet::load_with(
            &cfg("on_secret_violation = \"block\"\n\
                  [[secrets]]\nenv_var = \"A\"\nvalue = \"1\"\nallowed_hosts = [\"a.example\"]\n\
                  [[secrets]]\nenv_var = \"B\"\nvalue = \"2\"\nallowed_hosts = [\"a.example\"]\non_violation = \"block_and_terminate\""),
            &|_| None,
        )
        .unwrap();
        assert_eq!(set.secret(0).action, ViolationAction::Block);
        assert_eq!(set.secret(1).action, ViolationAction::BlockAndTerminate);
        let set = SecretSet::load_with(
            &cfg("[[secrets]]\nenv_var = \"A\"\nvalue = \"1\"\nallowed_hosts = [\"a.example\"]"),
            &|_| None,
        )
        .unwrap();
        assert_eq!(set.secret(0).action, ViolationAction::BlockAndLog);
    }

    #[test]
    fn percent_encoding_keeps_unreserved_only() {
        assert_eq!(percent_encode(b"a-Z_0.~"), b"a-Z_0.~");
        assert_eq!(percent_encode(b"a b&c=d/+%"), b"a%20b%26c%3Dd%2F%2B%25");
    }

    #[test]
    fn stepping_finds_placeholders_across_pieces() {
        let set = SecretSet::load_with(
            &cfg(
                "[[secrets]]\nenv_var = \"A\"\nvalue = \"1\"\nallowed_hosts = [\"a.example\"]\n\
                  [[secrets]]\nenv_var = \"B\"\nvalue = \"2\"\nallowed_hosts = [\"a.example\"]",
            ),
            &|_| None,
        )
        .unwrap();
        let a = set.secret(0).placeholder.clone();
        let b = set.secret(1).placeholder.clone();
        let text = format!("xx{a}{b}yy{a}");
        let found = set.find_all(text.as_bytes());
        let got: Vec<(usize, usize)> = found.iter().map(|f| (f.start, f.secret)).collect();
        assert_eq!(got, [(2, 0), (2 + a.len(), 1), (4 + a.len() + b.len(), 0)]);
        for cut in 0..text.len() {
            let mut state = set.start();
            let mut hits = Vec::new();
            for &byte in text.as_bytes()[..cut].iter().chain(&text.as_bytes()[cut..]) {
                hits.extend(set.step(&mut state, byte));
            }
            assert_eq!(hits, [0, 1, 0], "cut at {cut}");
        }
    }
}
