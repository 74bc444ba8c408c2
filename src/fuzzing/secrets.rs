//! Fuzz bodies for the secrets stage ([`crate::secrets`]): the HTTP request rewriter and the
//! raw placeholder scanner read every byte a guest sends on a connection that can carry
//! secrets, and decide where a real value may go.
//!
//! Input (both targets): eight bytes choose the configuration, then a record holds the guest's
//! bytes, then every remaining byte is the size (0-255) of the next piece they arrive in (what
//! is left after the last size is one more piece). The configuration bytes:
//!
//! - byte 0: bits 0-3, which of the four [`POOL`] secrets exist; bits 4-5, the config's
//!   `on_secret_violation` (unset, block, block_and_log, block_and_terminate);
//! - bytes 1-4, one per pool secret: bits 0-3, its `allowed_hosts` out of [`PATTERNS`] (none
//!   set: the pattern of its own index); bits 4-6, `substitute_in` = headers, query, body (none
//!   set: the default); bit 7, `on_violation = "block_and_terminate"`;
//! - byte 5: bits 0-1, the connection's port (80, 443, 8080, 1); bits 2-4, its SNI (0: none,
//!   else [`NAMES`]`[n - 1]`); bit 5, the SNI was verified;
//! - byte 6: the names the guest resolved for the destination (a bit per [`NAMES`] entry);
//! - byte 7: bits 0-1, `http-header-bytes` (default, 512, 128, 64); bits 2-3,
//!   `secret-body-bytes` (default, 0, 48, 600).
//!
//! The pool's values are `{X...}` with a letter X of their own and nothing in the braces that
//! is `{`, `}` or `%`, so a value (`{X`) or its query form (`%7BX`) in the output can only have
//! been put there by the stage when the guest wrote no `{` (or `%`) itself. Two pool
//! placeholders overlap (`org-token-0002-ab` ends as `ab-long-0003.tok` begins), which the
//! config allows.

use std::sync::Arc;

use super::{push_record, Input};
use crate::config::{default_placeholder, NetworkConfig, SecretEntry, SecretValue};
use crate::secrets::{
    HostContext, HttpLimits, HttpRequestRewriter, PlaceholderScanner, SecretSet, StreamError,
    SubstitutePart, ViolationAction, ViolationReason, MAX_CHUNK_LINE, MAX_HEADERS,
};

/// One secret the input may configure.
pub struct PoolSecret {
    pub env_var: &'static str,
    /// `None`: the derived default placeholder.
    pub placeholder: Option<&'static str>,
    /// The letter after the value's `{`.
    pub mark: u8,
}

pub const POOL: [PoolSecret; 4] = [
    PoolSecret {
        env_var: "API_KEY",
        placeholder: None,
        mark: b'A',
    },
    // Its value is shorter than its placeholder; its placeholder ends as LONG's begins.
    PoolSecret {
        env_var: "ORG",
        placeholder: Some("org-token-0002-ab"),
        mark: b'B',
    },
    // A short placeholder and a long value: the most growth per byte.
    PoolSecret {
        env_var: "LONG",
        placeholder: Some("ab-long-0003.tok"),
        mark: b'C',
    },
    PoolSecret {
        env_var: "TERM",
        placeholder: None,
        mark: b'D',
    },
];

/// The `allowed_hosts` entries the input chooses from.
pub const PATTERNS: [&str; 4] = [
    "api.example.com",
    "*.example.org",
    ".example.net",
    "EXAMPLE.com.",
];

/// The names an SNI or the resolved names are chosen from.
pub const NAMES: [&str; 8] = [
    "api.example.com",
    "API.Example.COM.",
    "a.example.org",
    "example.org",
    "x.example.net",
    "example.com",
    "other.test",
    "b.example.org",
];

const PORTS: [u16; 4] = [80, 443, 8080, 1];

/// The value of pool secret `i`: `{X` and a body without `{`, `}` or `%`, then `}`.
fn pool_value(i: usize) -> String {
    match i {
        0 => "{A/api+key=0001}".to_string(),
        1 => "{B}".to_string(),
        2 => format!("{{C{}}}", "Long-value-".repeat(25)),
        _ => "{D~term\tvalue}".to_string(),
    }
}

/// The placeholder of pool secret `i`.
pub fn pool_placeholder(i: usize) -> String {
    let s = &POOL[i];
    s.placeholder
        .map(str::to_string)
        .unwrap_or_else(|| default_placeholder(s.env_var))
}

/// Percent-encoding of everything but RFC 3986 unreserved (what a query value becomes).
fn percent_encoded(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in value {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

/// Trimmed, one trailing dot removed, lower case.
fn normalized(name: &str) -> String {
    let name = name.trim();
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Whether an `allowed_hosts` entry admits a normalized name (written here from the README:
/// exact names, and `*.suffix` / `.suffix` for names strictly below the suffix).
fn pattern_admits(pattern: &str, name: &str) -> bool {
    let pattern = normalized(pattern);
    match pattern
        .strip_prefix("*.")
        .or_else(|| pattern.strip_prefix('.'))
    {
        Some(suffix) => name.len() > suffix.len() + 1 && name.ends_with(&format!(".{suffix}")),
        None => name == pattern,
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() {
        return 0;
    }
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && hay
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
}

/// What the checks know of one configured secret.
struct Expect {
    env_var: String,
    placeholder: Vec<u8>,
    value: Vec<u8>,
    value_query: Vec<u8>,
    /// `{X`: only a value of this secret starts with it.
    mark: [u8; 2],
    /// `%7BX`: only this secret's query value starts with it.
    query_mark: Vec<u8>,
    /// The names bound to the destination (a resolved name, or the SNI when verified) that
    /// its `allowed_hosts` admits: the only hosts a request may be judged to be for and be
    /// allowed this secret.
    bound_allowed: Vec<String>,
}

/// The set a config builds, kept per configuration bytes (validating the config, deriving
/// placeholders and building the automaton cost more than a run): at most 4096 sets, all
/// dropped when full.
fn cached_set(key: [u8; 5], cfg: &NetworkConfig) -> Arc<SecretSet> {
    use std::cell::RefCell;
    use std::collections::HashMap;
    thread_local! {
        static SETS: RefCell<HashMap<[u8; 5], Arc<SecretSet>>> = RefCell::new(HashMap::new());
    }
    SETS.with(|sets| {
        let mut sets = sets.borrow_mut();
        if let Some(set) = sets.get(&key) {
            return set.clone();
        }
        let set = SecretSet::load_with(cfg, &|_| None)
            .unwrap_or_else(|e| panic!("the fuzz pool is a valid config: {e}"));
        if sets.len() >= 4096 {
            sets.clear();
        }
        let set = Arc::new(set);
        sets.insert(key, set.clone());
        set
    })
}

/// The configuration an input chose, and what the checks expect of it.
struct Setup {
    set: Arc<SecretSet>,
    ctx: HostContext,
    limits: HttpLimits,
    /// In the set's order.
    secrets: Vec<Expect>,
}

impl Setup {
    fn read(input: &mut Input) -> Setup {
        let mask = input.byte();
        let per_secret: Vec<u8> = (0..POOL.len()).map(|_| input.byte()).collect();
        let ctx_byte = input.byte();
        let resolved = input.byte();
        let limits_byte = input.byte();

        let mut cfg = NetworkConfig {
            on_secret_violation: match (mask >> 4) & 3 {
                0 => None,
                1 => Some(ViolationAction::Block),
                2 => Some(ViolationAction::BlockAndLog),
                _ => Some(ViolationAction::BlockAndTerminate),
            },
            ..NetworkConfig::default()
        };
        let mut chosen = Vec::new();
        for (i, pool) in POOL.iter().enumerate() {
            if mask & (1 << i) == 0 {
                continue;
            }
            let b = per_secret[i];
            let patterns: Vec<&str> = match b & 0x0f {
                0 => vec![PATTERNS[i]],
                bits => (0..4)
                    .filter(|p| bits & (1 << p) != 0)
                    .map(|p| PATTERNS[p])
                    .collect(),
            };
            let parts: Vec<SubstitutePart> = [
                SubstitutePart::Headers,
                SubstitutePart::Query,
                SubstitutePart::Body,
            ]
            .into_iter()
            .enumerate()
            .filter(|(p, _)| (b >> 4) & (1 << p) != 0)
            .map(|(_, part)| part)
            .collect();
            cfg.secrets.push(SecretEntry {
                env_var: pool.env_var.to_string(),
                value: Some(SecretValue::new(pool_value(i))),
                value_env: None,
                value_file: None,
                placeholder: pool.placeholder.map(str::to_string),
                allowed_hosts: patterns.iter().map(|p| p.to_string()).collect(),
                on_violation: (b & 0x80 != 0).then_some(ViolationAction::BlockAndTerminate),
                substitute_in: (!parts.is_empty()).then_some(parts),
            });
            chosen.push((i, patterns));
        }
        let mut key = [mask; 5];
        key[1..].copy_from_slice(&per_secret);
        let set = cached_set(key, &cfg);

        let sni_index = usize::from((ctx_byte >> 2) & 7);
        let ctx = HostContext {
            port: PORTS[usize::from(ctx_byte & 3)],
            sni: (sni_index > 0).then(|| NAMES[sni_index - 1].to_string()),
            sni_verified: ctx_byte & 0x20 != 0,
            resolved_names: (0..NAMES.len())
                .filter(|n| resolved & (1 << n) != 0)
                .map(|n| NAMES[n].to_string())
                .collect(),
        };
        let defaults = HttpLimits::default();
        let limits = HttpLimits {
            header_bytes: [defaults.header_bytes, 512, 128, 64][usize::from(limits_byte & 3)],
            body_bytes: [defaults.body_bytes, 0, 48, 600][usize::from((limits_byte >> 2) & 3)],
        };

        let mut bound: Vec<String> = ctx.resolved_names.iter().map(|n| normalized(n)).collect();
        if let (Some(sni), true) = (&ctx.sni, ctx.sni_verified) {
            bound.push(normalized(sni));
        }
        let secrets = chosen
            .into_iter()
            .map(|(i, patterns)| {
                let value = pool_value(i).into_bytes();
                Expect {
                    env_var: POOL[i].env_var.to_string(),
                    placeholder: pool_placeholder(i).into_bytes(),
                    value_query: percent_encoded(&value),
                    value,
                    mark: [b'{', POOL[i].mark],
                    query_mark: [b"%7B".as_slice(), &[POOL[i].mark]].concat(),
                    bound_allowed: bound
                        .iter()
                        .filter(|n| patterns.iter().any(|p| pattern_admits(p, n)))
                        .cloned()
                        .collect(),
                }
            })
            .collect();
        Setup {
            set,
            ctx,
            limits,
            secrets,
        }
    }

    /// A placeholder of `secret` may pass: some name bound to the destination is allowed.
    fn placeholder_may_pass(&self, secret: usize) -> bool {
        !self.secrets[secret].bound_allowed.is_empty()
    }

    /// A value of `secret` may be put in: an allowed bound name that the guest's bytes name
    /// (a request's host is the name its `Host` header writes).
    fn value_may_go(&self, secret: usize, stream: &[u8]) -> bool {
        self.secrets[secret]
            .bound_allowed
            .iter()
            .any(|n| contains_ignore_case(stream, n.as_bytes()))
    }

    /// Holds the stage may keep between calls (the documented bounds of `buffered`).
    fn max_buffered(&self) -> usize {
        let longest = self.set.longest_placeholder();
        (self.limits.header_bytes + self.limits.body_bytes)
            .max(MAX_CHUNK_LINE + longest)
            .max(self.limits.header_bytes + longest)
    }
}

/// `stream` cut into pieces of the sizes in `sizes`, the rest as the last piece.
fn pieces<'a>(stream: &'a [u8], sizes: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = stream;
    for &size in sizes {
        let (head, tail) = rest.split_at(usize::from(size).min(rest.len()));
        out.push(head);
        rest = tail;
    }
    out.push(rest);
    out
}

/// What one run of the rewriter sent: the output of the calls that succeeded, and how it
/// ended.
struct Run {
    sent: Vec<u8>,
    result: Result<(), StreamError>,
}

fn run_http(setup: &Setup, pieces: &[&[u8]]) -> Run {
    let mut rw = HttpRequestRewriter::new(setup.set.clone(), setup.ctx.clone(), setup.limits);
    let mut sent = Vec::new();
    let mut result = Ok(());
    for piece in pieces {
        let before = sent.len();
        if let Err(e) = rw.push(piece, &mut sent) {
            sent.truncate(before);
            result = Err(e);
            break;
        }
        assert!(
            rw.buffered() <= setup.max_buffered(),
            "{} bytes held, over the documented bound {}",
            rw.buffered(),
            setup.max_buffered()
        );
    }
    if result.is_ok() {
        let before = sent.len();
        if let Err(e) = rw.finish(&mut sent) {
            sent.truncate(before);
            result = Err(e);
        }
    }
    if let Err(e) = &result {
        let mut more = Vec::new();
        assert_eq!(
            rw.push(b"GET", &mut more).as_ref(),
            Err(e),
            "after an error"
        );
        assert_eq!(rw.finish(&mut more).as_ref(), Err(e), "after an error");
    }
    Run { sent, result }
}

/// What part of the stream a server sees some bytes as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// CR and LF between requests.
    Blank,
    Head,
    /// A request body: a Content-Length body, or the data of a chunked body joined.
    Body,
    /// A chunk-size line with its extensions.
    ChunkLine,
    Trailers,
    /// Not parsed as HTTP: what follows CONNECT or an Upgrade request, or what does not parse.
    Raw,
}

/// The output as an HTTP/1.1 server frames it (what the README's rules speak of): request
/// heads, bodies (chunked ones de-chunked), chunk lines, trailers, and what is not HTTP. It
/// follows the stage's framing (Transfer-Encoding wins, as the stage refuses both together;
/// CONNECT and Upgrade end the HTTP part); bytes it cannot frame end it as raw.
fn server_view(mut rest: &[u8]) -> Vec<(Part, Vec<u8>)> {
    let mut parts = Vec::new();
    loop {
        let blank = rest
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        if blank > 0 {
            parts.push((Part::Blank, rest[..blank].to_vec()));
            rest = &rest[blank..];
        }
        if rest.is_empty() {
            return parts;
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut fields);
        let Ok(httparse::Status::Complete(n)) = req.parse(rest) else {
            parts.push((Part::Raw, rest.to_vec()));
            return parts;
        };
        let named = |name: &'static str| {
            req.headers
                .iter()
                .filter(move |f| f.name.eq_ignore_ascii_case(name))
        };
        let connect = req
            .method
            .is_some_and(|m| m.eq_ignore_ascii_case("CONNECT"));
        let upgrade = named("upgrade").next().is_some();
        let chunked = named("transfer-encoding").next().is_some();
        let length = named("content-length")
            .flat_map(|f| f.value.split(|&b| b == b','))
            .find_map(|item| {
                std::str::from_utf8(item.trim_ascii())
                    .ok()?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0);
        parts.push((Part::Head, rest[..n].to_vec()));
        rest = &rest[n..];
        if connect {
            break;
        }
        if chunked {
            match dechunk(rest, &mut parts) {
                Some(after) => rest = after,
                None => return parts,
            }
        } else {
            let n = usize::try_from(length)
                .unwrap_or(usize::MAX)
                .min(rest.len());
            if n > 0 {
                parts.push((Part::Body, rest[..n].to_vec()));
            }
            rest = &rest[n..];
        }
        if upgrade {
            break;
        }
    }
    if !rest.is_empty() {
        parts.push((Part::Raw, rest.to_vec()));
    }
    parts
}

/// Frames one chunked body at the start of `rest`; the bytes after it, or `None` when the
/// output ends inside it or leaves the chunked grammar (the rest then went in as raw).
fn dechunk<'a>(mut rest: &'a [u8], parts: &mut Vec<(Part, Vec<u8>)>) -> Option<&'a [u8]> {
    let mut data = Vec::new();
    loop {
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            raw_tail(&mut data, parts, rest);
            return None;
        };
        let line = &rest[..nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let digits = line
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        let size = std::str::from_utf8(digits)
            .ok()
            .filter(|d| !d.is_empty() && d.len() <= 15)
            .and_then(|d| u64::from_str_radix(d, 16).ok());
        let Some(size) = size else {
            raw_tail(&mut data, parts, rest);
            return None;
        };
        parts.push((Part::ChunkLine, rest[..=nl].to_vec()));
        rest = &rest[nl + 1..];
        if size == 0 {
            if !data.is_empty() {
                parts.push((Part::Body, std::mem::take(&mut data)));
            }
            let end = match rest {
                [b'\n', ..] => Some(1),
                [b'\r', b'\n', ..] => Some(2),
                _ => trailers_end(rest),
            };
            let Some(end) = end else {
                raw_tail(&mut data, parts, rest);
                return None;
            };
            parts.push((Part::Trailers, rest[..end].to_vec()));
            return Some(&rest[end..]);
        }
        let n = usize::try_from(size).unwrap_or(usize::MAX).min(rest.len());
        data.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        if (n as u64) < size {
            raw_tail(&mut data, parts, &[]);
            return None;
        }
        match rest.strip_prefix(b"\r\n") {
            Some(after) => rest = after,
            None => {
                raw_tail(&mut data, parts, rest);
                return None;
            }
        }
    }
}

/// Ends a chunked body the output leaves: its data so far, then `tail` as raw.
fn raw_tail(data: &mut Vec<u8>, parts: &mut Vec<(Part, Vec<u8>)>, tail: &[u8]) {
    if !data.is_empty() {
        parts.push((Part::Body, std::mem::take(data)));
    }
    if !tail.is_empty() {
        parts.push((Part::Raw, tail.to_vec()));
    }
}

/// Just past the blank line that ends a trailer section (LF or CRLF line ends).
fn trailers_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(off) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let nl = i + off;
        match buf.get(nl + 1..) {
            Some([b'\n', ..]) => return Some(nl + 2),
            Some([b'\r', b'\n', ..]) => return Some(nl + 3),
            _ => {}
        }
        i = nl + 1;
    }
    None
}

/// The server view without the chunk lines: two outputs that differ only in how their
/// rewritten bodies are cut into chunks give the same.
fn canonical(out: &[u8]) -> Vec<(Part, Vec<u8>)> {
    let mut parts: Vec<(Part, Vec<u8>)> = Vec::new();
    for (part, bytes) in server_view(out) {
        if part == Part::ChunkLine {
            continue;
        }
        match parts.last_mut() {
            Some((last, joined)) if *last == part && part == Part::Body => {
                joined.extend_from_slice(&bytes)
            }
            _ => parts.push((part, bytes)),
        }
    }
    parts
}

/// The most the output can grow over the input (all from the code, see below).
fn output_bound(setup: &Setup, stream: &[u8], pieces: usize) -> usize {
    let lines = count(stream, b"\n");
    let auth_fields = stream
        .windows(13)
        .filter(|w| w.eq_ignore_ascii_case(b"authorization"))
        .count();
    let length_fields = stream
        .windows(14)
        .filter(|w| w.eq_ignore_ascii_case(b"content-length"))
        .count();
    let mut bound = stream.len();
    for s in &setup.secrets {
        let p = s.placeholder.len();
        // A substitution puts the value (or its query form) where the placeholder was; in
        // Basic credentials, a base64 text 4/3 as long (padding counted per field below).
        let growth = s
            .value_query
            .len()
            .max(s.value.len())
            .max((4 * s.value.len()).div_ceil(3) + 1)
            .saturating_sub(p);
        // Substitutions: placeholders written whole, plus at most one per line end (a
        // chunked body's data can join pieces across its chunk lines), plus those in
        // decoded Basic credentials (at most 3/4 of the input, no overlap).
        let basic = if auth_fields > 0 {
            stream.len() * 3 / 4 / p
        } else {
            0
        };
        bound += (count(stream, &s.placeholder) + lines + basic) * growth;
    }
    // Base64 padding of a re-encoded Basic token; a new Content-Length value (at most 20
    // digits for one of at least one); a new chunk's size line and CRLF (at most 16 hex
    // digits + 4) per chunk written: one per input chunk per piece, plus the flushes.
    bound + 3 * auth_fields + 20 * length_fields + 20 * (lines + pieces + 2)
}

/// What must hold of the bytes one run sent.
fn check_sent(setup: &Setup, stream: &[u8], pieces: usize, run: &Run, what: &str) {
    let bound = output_bound(setup, stream, pieces);
    assert!(
        run.sent.len() <= bound,
        "{what}: {} bytes out of {} in, over the bound {bound}",
        run.sent.len(),
        stream.len()
    );
    // A placeholder passes (anywhere a server would see it whole: a head, a body's data,
    // a chunk line, trailers, what is not HTTP) only where its secret allows the host; a
    // stage that can bind the request to no allowed name must replace it or fail.
    for (part, bytes) in server_view(&run.sent) {
        for (i, s) in setup.secrets.iter().enumerate() {
            assert!(
                setup.placeholder_may_pass(i) || !contains(&bytes, &s.placeholder),
                "{what}: placeholder of {} passed in a {part:?} though no name bound to the \
                 destination is allowed for it",
                s.env_var
            );
        }
    }
    // A value (whole, never cut) goes only to a host its secret allows.
    let guest_wrote_brace = stream.contains(&b'{');
    let guest_wrote_percent = stream.contains(&b'%');
    for (i, s) in setup.secrets.iter().enumerate() {
        if !guest_wrote_brace {
            for at in 0..run.sent.len().saturating_sub(1) {
                if run.sent[at..].starts_with(&s.mark) {
                    assert!(
                        setup.value_may_go(i, stream),
                        "{what}: the value of {} went out, and no allowed name bound to the \
                         destination is in the request",
                        s.env_var
                    );
                    assert!(
                        run.sent[at..].starts_with(&s.value),
                        "{what}: part of the value of {} went out",
                        s.env_var
                    );
                }
            }
        }
        if !guest_wrote_percent && contains(&run.sent, &s.query_mark) {
            assert!(
                setup.value_may_go(i, stream) && contains(&run.sent, &s.value_query),
                "{what}: the query value of {} went out to a host it does not allow, or cut",
                s.env_var
            );
        }
    }
}

/// Input: see the module. Runs the HTTP request rewriter over the guest's bytes twice, in one
/// piece and in the pieces given, then `finish`.
///
/// Holds, for both runs: no panic; what the calls that succeeded appended (the bytes that
/// would be sent) is at most the input plus each possible substitution's growth plus new
/// framing ([`output_bound`]); no more is held than `buffered`'s documented bound; after an
/// error every call gives it again. In what was sent, as a server frames it: a placeholder
/// appears only if its secret allows a name bound to the destination (a resolved name or a
/// verified SNI); a value appears only whole, and only if its secret allows a bound name that
/// the guest's bytes write (the request's `Host`). And the two runs agree: the same error, or
/// the same output up to how rewritten chunked bodies are cut into chunks.
pub fn http(data: &[u8]) {
    let mut input = Input::new(data);
    let setup = Setup::read(&mut input);
    let stream = input.record();
    let split = pieces(stream, input.rest());
    let whole = run_http(&setup, &[stream]);
    let cut = run_http(&setup, &split);
    check_sent(&setup, stream, 1, &whole, "in one piece");
    check_sent(&setup, stream, split.len(), &cut, "in pieces");
    match (&whole.result, &cut.result) {
        (Ok(()), Ok(())) => assert_eq!(
            canonical(&whole.sent),
            canonical(&cut.sent),
            "the output differs when the input comes in {} pieces",
            split.len()
        ),
        (a, b) => assert_eq!(a, b, "in one piece, then in {} pieces", split.len()),
    }
}

/// Input: see the module. Runs the raw scanner over the guest's bytes in one piece and in the
/// pieces given.
///
/// Holds: no panic, nothing held; the scan fails exactly when a placeholder occurs whose
/// secret allows no name bound to the destination (a resolved name or a verified SNI), and it
/// names such a secret with the reason `RawStream`; the pieces give the same result, and the
/// pieces passed before a failure hold no such placeholder; after a failure every call fails
/// the same way.
pub fn raw(data: &[u8]) {
    let mut input = Input::new(data);
    let setup = Setup::read(&mut input);
    let stream = input.record();
    let split = pieces(stream, input.rest());

    let forbidden: Vec<usize> = (0..setup.secrets.len())
        .filter(|&i| {
            !setup.placeholder_may_pass(i) && contains(stream, &setup.secrets[i].placeholder)
        })
        .collect();
    let mut whole = PlaceholderScanner::new(setup.set.clone(), &setup.ctx);
    let result = whole.scan(stream);
    assert_eq!(whole.buffered(), 0);
    match &result {
        Ok(()) => assert!(
            forbidden.is_empty(),
            "the placeholder of {} passed, and no name bound to the destination is allowed \
             for it",
            setup.secrets[forbidden[0]].env_var
        ),
        Err(v) => {
            assert!(
                forbidden
                    .iter()
                    .any(|&i| setup.secrets[i].env_var == v.secret),
                "violation of {} without its placeholder to a host it does not allow",
                v.secret
            );
            assert_eq!(v.reason, ViolationReason::RawStream);
            assert_eq!(v.port, setup.ctx.port);
            assert_eq!(whole.scan(b"").as_ref(), Err(v), "after a failure");
        }
    }

    let mut cut = PlaceholderScanner::new(setup.set.clone(), &setup.ctx);
    let mut passed = Vec::new();
    let mut cut_result = Ok(());
    for piece in &split {
        if let Err(v) = cut.scan(piece) {
            cut_result = Err(v);
            break;
        }
        passed.extend_from_slice(piece);
    }
    assert_eq!(
        cut_result,
        result,
        "in {} pieces, then in one piece",
        split.len()
    );
    for (i, s) in setup.secrets.iter().enumerate() {
        assert!(
            setup.placeholder_may_pass(i) || !contains(&passed, &s.placeholder),
            "the placeholder of {} passed in pieces",
            s.env_var
        );
    }
}

/// The configuration bytes of a seed: all four secrets, each with its `allowed` mask and
/// `parts` (bits of headers, query, body), the context and the limits byte.
fn config_bytes(allowed_parts: [u8; 4], ctx: u8, resolved: u8, limits: u8) -> Vec<u8> {
    let mut out = vec![0x0f];
    out.extend_from_slice(&allowed_parts);
    out.extend_from_slice(&[ctx, resolved, limits]);
    out
}

/// API_KEY for api.example.com in all parts, ORG below example.org in headers, LONG for
/// api.example.com in headers and body, TERM for example.com (headers, block_and_terminate).
const ALL_PARTS: [u8; 4] = [0x71, 0x12, 0x51, 0x98];

/// Context byte: port 80, no SNI.
const PLAIN_80: u8 = 0;
/// Context byte: port 443, SNI api.example.com, verified.
const TLS_API: u8 = 1 | (1 << 2) | 0x20;
/// Resolved names: api.example.com.
const RESOLVED_API: u8 = 1;

fn seed(config: &[u8], stream: &[u8], sizes: &[u8]) -> Vec<u8> {
    let mut out = config.to_vec();
    push_record(&mut out, stream);
    out.extend_from_slice(sizes);
    out
}

fn http_streams() -> Vec<Vec<u8>> {
    let key = pool_placeholder(0);
    let org = pool_placeholder(1);
    let long = pool_placeholder(2);
    let term = pool_placeholder(3);
    let basic = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("user:{key}"))
    };
    let body = format!("{{\"key\":\"{key}\",\"long\":\"{long}\"}}").replace(['{', '}'], "");
    let chunked_data = format!("key={key}&long={long}");
    let (c1, c2) = chunked_data.split_at(20);
    vec![
        format!(
            "GET /v1/models HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer {key}\r\n\
             X-Long: {long}\r\nAccept: */*\r\n\r\n"
        ),
        format!("GET / HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Basic {basic}\r\n\r\n"),
        format!("GET /search?q=1&key={key}&x={long}#frag HTTP/1.1\r\nHost: API.example.com.:80\r\n\r\n"),
        format!(
            "POST /v1/items HTTP/1.1\r\nHost: api.example.com\r\nContent-Type: text/plain\r\n\
             Expect: 100-continue\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        format!(
            "POST /up HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x};ext=1\r\n{c1}\r\n{:x}\r\n{c2}\r\n0\r\nX-Trailer: t\r\n\r\n",
            c1.len(),
            c2.len()
        ),
        format!(
            "GET /a HTTP/1.1\r\nHost: api.example.com\r\nX-Key: {key}\r\n\r\n\
             POST /b HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 5\r\n\r\nhello\
             \r\nGET /c HTTP/1.1\r\nHost: a.example.org\r\nX-Org: {org}\r\n\r\n"
        ),
        format!(
            "CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n\
             tunnel bytes {key}"
        ),
        format!(
            "GET /ws HTTP/1.1\r\nHost: api.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             X-Key: {key}\r\n\r\nframes {term}"
        ),
        format!("GET http://api.example.com/x HTTP/1.1\r\nHost: api.example.com\r\nX-Term: {term}\r\n\r\n"),
        format!("GET /{org}-{long} HTTP/1.1\r\nHost: api.example.com\r\nX: {org}-{long}\r\n\r\n"),
        format!("GET / HTTP/1.1\r\nHost: other.test\r\nX-Key: {key}\r\n\r\n"),
        format!("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n{key}"),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect()
}

pub fn http_seeds() -> Vec<Vec<u8>> {
    let streams = http_streams();
    let contexts = [
        config_bytes(ALL_PARTS, PLAIN_80, RESOLVED_API, 0),
        config_bytes(ALL_PARTS, TLS_API, 0, 0),
        config_bytes(ALL_PARTS, PLAIN_80, 0, 0),
        config_bytes(ALL_PARTS, PLAIN_80, RESOLVED_API | (1 << 2), 0x0a),
    ];
    let sizes: [&[u8]; 4] = [&[], &[30, 1, 7, 200, 3], &[64, 64, 64, 64, 64], &[5; 40]];
    streams
        .iter()
        .enumerate()
        .map(|(i, stream)| {
            seed(
                &contexts[i % contexts.len()],
                stream,
                sizes[i % sizes.len()],
            )
        })
        .collect()
}

pub fn raw_seeds() -> Vec<Vec<u8>> {
    let key = pool_placeholder(0);
    let org = pool_placeholder(1);
    let long = pool_placeholder(2);
    let streams = [
        format!("\x16\x03\x01 binary {key} more"),
        format!("{org}-{long}"),
        format!("{org}{long}{key}"),
        "no placeholder here".to_string(),
    ];
    let contexts = [
        config_bytes(ALL_PARTS, PLAIN_80, RESOLVED_API, 0),
        config_bytes(ALL_PARTS, TLS_API, 0, 0),
        config_bytes(ALL_PARTS, PLAIN_80, 1 << 2, 0),
        config_bytes(ALL_PARTS, PLAIN_80, 0, 0),
    ];
    let mut out = Vec::new();
    for (i, stream) in streams.iter().enumerate() {
        for (j, context) in contexts.iter().enumerate() {
            if (i + j) % 2 == 0 {
                out.push(seed(context, stream.as_bytes(), &[10, 3, 20]));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_placeholders_overlap_and_values_are_marked() {
        assert!(pool_placeholder(1).ends_with("ab") && pool_placeholder(2).starts_with("ab"));
        for (i, pool) in POOL.iter().enumerate() {
            let value = pool_value(i);
            assert_eq!(value.as_bytes()[..2], [b'{', pool.mark]);
            assert!(value.ends_with('}'));
            assert!(!value[1..value.len() - 1].contains(['{', '}', '%']));
        }
    }

    #[test]
    fn the_server_view_joins_chunked_data_and_splits_parts() {
        let out = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\nGET / HTTP/1.1\r\nContent-Length: 2\r\n\r\nxyGARBAGE";
        let view = server_view(out);
        let kinds: Vec<Part> = view.iter().map(|(p, _)| *p).collect();
        assert_eq!(
            kinds,
            [
                Part::Head,
                Part::ChunkLine,
                Part::ChunkLine,
                Part::ChunkLine,
                Part::Body,
                Part::Trailers,
                Part::Head,
                Part::Body,
                Part::Raw
            ]
        );
        assert_eq!(view[4].1, b"abcde");
        assert_eq!(view[7].1, b"xy");
    }

    #[test]
    fn patterns_admit_as_the_readme_says() {
        assert!(pattern_admits("EXAMPLE.com.", "example.com"));
        assert!(pattern_admits("*.example.org", "a.example.org"));
        assert!(!pattern_admits("*.example.org", "example.org"));
        assert!(pattern_admits(".example.net", "x.example.net"));
        assert!(!pattern_admits(".example.net", "xexample.net"));
    }
}
