//! Secrets: the guest holds a placeholder, netfence puts the real value into the HTTP requests
//! that go to the hosts the secret belongs to, and reports a placeholder bound anywhere else.
//!
//! Theory of operation. [`SecretSet::load`] turns the config's `secrets` into a table (values
//! read from the config, netfence's environment or a file, kept only in zeroed-on-drop memory)
//! and one Aho-Corasick automaton over all placeholders. A TCP flow that can carry secrets gets
//! one of two middle stages for its guest -> server direction:
//!
//! - [`HttpRequestRewriter`] (plain HTTP, and the cleartext of intercepted TLS): parses each
//!   request head with `httparse`, finds the request's host and whether it is *bound* to the
//!   destination ([`HostContext`], rules below), replaces placeholders of the secrets that allow
//!   that host in the parts they opt into (headers, query, body), and fails with a
//!   [`Violation`] when a placeholder appears in a request its secret does not allow.
//! - [`PlaceholderScanner`] (any other cleartext TCP stream): substitutes nothing, and fails
//!   with a [`Violation`] when a placeholder of a secret appears, unless a name the guest
//!   resolved for the destination (or a verified SNI) is in that secret's `allowed_hosts`.
//!
//! Both find a placeholder split across any number of `push` calls (TCP segments, TLS
//! records): the automaton's state is carried between calls, and a substituting stage holds
//! back at most the longest placeholder's length minus one byte.
//!
//! Host agreement (what "a request to an allowed host" means). The request's host is the name
//! in its single `Host` header (lower-cased, trailing dot and `:port` removed). It *agrees*
//! with the connection when: the `Host` port, if written, is the connection's port; the
//! request target is origin-form (`/path`), `*`, CONNECT's authority, or an absolute-form
//! `http`/`https` URL naming the same host and port (servers route by an absolute-form target
//! of any scheme before `Host`); the SNI, when there is one, is that name; and the names the guest resolved for the destination address, when there are any,
//! include it. It is *bound* to the destination when, besides, netfence's upstream TLS
//! connection verified a certificate for it (`sni` and `sni_verified`) or the guest resolved it
//! to the destination address. Only a bound host can receive a value: a placeholder in a
//! request with no `Host` name (missing, repeated, an IP literal), a disagreeing host or an
//! unbound one is a violation of every secret whose placeholder it carries, as is a
//! placeholder for a bound host outside the secret's `allowed_hosts`. `allowed_hosts` entries
//! are exact names or `*.suffix` (also written `.suffix`), which matches names *below* the
//! suffix only: write the apex too if it is meant.
//!
//! Bounds: a request head is at most `http-header-bytes` (limits.rs), a Content-Length body
//! held for substitution at most `secret-body-bytes`, a chunk-size line [`MAX_CHUNK_LINE`]
//! bytes, and a head at most [`MAX_HEADERS`] fields; everything else streams through with
//! less than one placeholder's length held. The same bounds hold after substitution (a value
//! may be a thousand times its placeholder's length): a rewritten head is at most
//! `http-header-bytes`, and the values add at most `secret-body-bytes` to a body. On any error the caller resets the connection and
//! sends nothing of that call's output.

mod env;
mod http;
mod raw;
mod set;
#[cfg(test)]
mod tests;

use std::fmt;

pub use env::{env_lines, run_env, shell_quote, EnvArgs};
pub use http::{HttpRequestRewriter, MAX_CHUNK_LINE, MAX_HEADERS};
pub use raw::PlaceholderScanner;
pub use set::SecretSet;

pub use crate::config::{SubstitutePart, ViolationAction};

/// What a stage knows about the connection it rewrites or scans.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostContext {
    /// The destination port the guest connected to (the guest's view, before `--map`).
    pub port: u16,
    /// The SNI of the guest's ClientHello on an intercepted TLS connection; `None` for plain
    /// HTTP.
    pub sni: Option<String>,
    /// Whether netfence's upstream TLS connection verified the server's certificate for `sni`
    /// (false when `tls.verify_upstream = false`, or when there is no upstream TLS).
    pub sni_verified: bool,
    /// The names the guest resolved (through the gateway DNS) to the destination address.
    pub resolved_names: Vec<String>,
}

/// Why a placeholder was not substituted but reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViolationReason {
    /// The request's host is bound to the destination but not in the secret's `allowed_hosts`.
    HostNotAllowed,
    /// The request has no usable `Host` name: none, several, or an IP literal.
    NoHost,
    /// The `Host` header disagrees with the connection.
    HostMismatch(Mismatch),
    /// The host agrees but nothing binds it to the destination: no verified SNI, and the guest
    /// did not resolve it to the destination address.
    HostUnverified,
    /// The placeholder is in a stream netfence does not parse as HTTP (not HTTP, after an
    /// upgrade or CONNECT, or on a port without HTTP parsing), and no name of the destination is
    /// allowed for the secret.
    RawStream,
}

/// What the `Host` header disagrees with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// The TLS SNI names another host.
    Sni,
    /// The guest resolved the destination address under other names only.
    ResolvedNames,
    /// The `Host` header names another port than the connection's.
    Port,
    /// The request target names another host or port, or is of a form that names a host
    /// other than by `http(s)://` (another scheme, a bare authority).
    Target,
}

impl fmt::Display for ViolationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ViolationReason::HostNotAllowed => "host not in the secret's allowed_hosts",
            ViolationReason::NoHost => "request without a usable Host name",
            ViolationReason::HostMismatch(Mismatch::Sni) => "Host header differs from the TLS SNI",
            ViolationReason::HostMismatch(Mismatch::ResolvedNames) => {
                "Host header is not a name the guest resolved for the destination"
            }
            ViolationReason::HostMismatch(Mismatch::Port) => {
                "Host header names another port than the connection's"
            }
            ViolationReason::HostMismatch(Mismatch::Target) => {
                "request target names another host than the Host header"
            }
            ViolationReason::HostUnverified => {
                "Host is neither a verified TLS name nor resolved by the guest to the destination"
            }
            ViolationReason::RawStream => "placeholder in a stream that is not parsed as HTTP",
        })
    }
}

/// A placeholder bound for a host its secret does not allow. It names the secret (its
/// `env_var`), never its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The secret's `env_var`.
    pub secret: String,
    /// The request's host as the guest wrote it (printable ASCII, at most 255 bytes), else the
    /// SNI or a resolved name; empty when none is known.
    pub host: String,
    /// The connection's destination port.
    pub port: u16,
    /// The secret's `on_violation`, else the config's `on_secret_violation`.
    pub action: ViolationAction,
    pub reason: ViolationReason,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.is_empty() {
            "an unnamed host"
        } else {
            &self.host
        };
        write!(
            f,
            "placeholder of secret {} sent to {host} port {} ({}); action {}",
            self.secret, self.port, self.reason, self.action
        )
    }
}

impl std::error::Error for Violation {}

/// A request stream netfence refuses to carry: the connection is reset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A request head longer than `http-header-bytes` (the limit is given).
    HeadTooLarge(usize),
    /// A request head with more than [`MAX_HEADERS`] fields.
    TooManyHeaders,
    /// A Content-Length body over `secret-body-bytes` on a request whose body would be
    /// searched for placeholders to substitute (length, limit).
    BodyTooLarge(u64, usize),
    /// Content-Length and Transfer-Encoding together, conflicting or invalid lengths, or a
    /// transfer coding other than chunked last: the server could frame it differently.
    Framing(&'static str),
    /// A malformed chunked body (bad size line, missing CRLF, trailers too long).
    BadChunk(&'static str),
    /// The values put into a request would take its head over `http-header-bytes`, or add more
    /// than `secret-body-bytes` to its body (the limit's name and value): a value much longer
    /// than its placeholder must not let the guest grow a request past netfence's bounds.
    ValuesTooLarge(&'static str, usize),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::HeadTooLarge(limit) => write!(
                f,
                "request header too large (over http-header-bytes = {limit})"
            ),
            Refusal::TooManyHeaders => {
                write!(f, "request header has more than {MAX_HEADERS} fields")
            }
            Refusal::BodyTooLarge(len, limit) => write!(
                f,
                "request body of {len} bytes is over secret-body-bytes = {limit}, and it would \
                 be searched for placeholders to substitute"
            ),
            Refusal::Framing(what) => write!(f, "ambiguous request framing: {what}"),
            Refusal::BadChunk(what) => write!(f, "malformed chunked body: {what}"),
            Refusal::ValuesTooLarge(name, limit) => write!(
                f,
                "request too large once the secrets' values are put in (over {name} = {limit})"
            ),
        }
    }
}

/// Why a stage stopped: the connection must be reset, and nothing of the failing call's
/// output sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamError {
    Violation(Violation),
    Refused(Refusal),
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Violation(v) => v.fmt(f),
            StreamError::Refused(r) => r.fmt(f),
        }
    }
}

impl std::error::Error for StreamError {}

impl From<Violation> for StreamError {
    fn from(v: Violation) -> Self {
        StreamError::Violation(v)
    }
}

impl From<Refusal> for StreamError {
    fn from(r: Refusal) -> Self {
        StreamError::Refused(r)
    }
}

/// The bounds of one [`HttpRequestRewriter`], from [`crate::limits::Limits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// `http-header-bytes`: the longest request head (request line, fields, blank line).
    pub header_bytes: usize,
    /// `secret-body-bytes`: the longest Content-Length body held for substitution.
    pub body_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits::from(&crate::limits::Limits::default())
    }
}

impl From<&crate::limits::Limits> for HttpLimits {
    fn from(l: &crate::limits::Limits) -> Self {
        HttpLimits {
            header_bytes: l.http_header_bytes,
            body_bytes: l.secret_body_bytes,
        }
    }
}

/// Guest-written text made safe for a log line: printable ASCII only, at most 255 bytes.
pub(crate) fn printable(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(255)
        .map(|&b| {
            if (0x21..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}
