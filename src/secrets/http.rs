//! The secrets stage for the guest -> server direction of one HTTP/1.x connection (plain HTTP,
//! or the cleartext of intercepted TLS): placeholders are replaced by values in the requests
//! whose host the secret allows, and reported in any other request.
//!
//! Each request goes through three steps. (1) Its head is collected (at most
//! `http-header-bytes`) and parsed with `httparse`. (2) Its host is judged once against the
//! connection ([`super::HostContext`], rules in the module above), and every placeholder in
//! the head (request line, field values, decoded Basic credentials) gets a verdict: replace,
//! leave as it is (allowed host, part not opted into), or violation. Replacements are spliced
//! into the raw head, so every other byte goes out exactly as the guest wrote it. (3) The body
//! is framed as the server will frame it (Content-Length or chunked; both together, or any
//! other transfer coding, are refused):
//! - no secret may be replaced in this request's body: it streams through, scanned;
//! - Content-Length, a body secret allowed: the head is held with the body (at most
//!   `secret-body-bytes`), then both go out with the new Content-Length (and without
//!   `Expect: 100-continue`, which would wait for an answer to a head the server has not seen);
//! - chunked, a body secret allowed: the de-chunked data is rewritten as a stream (less than a
//!   placeholder held back) and sent as new chunks with their own sizes; extensions are
//!   dropped, trailers pass as they are.
//!
//! Query strings are matched literally in the raw target (placeholders hold only characters a
//! URL never escapes, so a client has no reason to encode them); the value goes in
//! percent-encoded, so the server decodes exactly the value. Header values are replaced
//! literally; `Authorization` / `Proxy-Authorization: Basic` credentials are decoded, replaced
//! in `user:pass` and encoded again. Anything that is not an HTTP/1.x request (HTTP/2's
//! preface, TLS, a binary protocol), and whatever follows CONNECT or a request with `Upgrade`,
//! is scanned like a raw stream ([`super::PlaceholderScanner`]) and never substituted.

use std::ops::Range;
use std::sync::Arc;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;

use super::set::{context_host, ScanState, SecretSet};
use super::{
    printable, HostContext, HttpLimits, Mismatch, PlaceholderScanner, Refusal, StreamError,
    SubstitutePart, Violation, ViolationReason,
};
use crate::dns::names::normalize_name;

/// Header fields parsed per request head; a head with more is refused.
pub const MAX_HEADERS: usize = 256;
/// Longest chunk-size line (size and extensions) of a chunked request body.
pub const MAX_CHUNK_LINE: usize = 4096;

/// Basic credentials as clients write them, padding optional on input.
const BASIC_DECODE: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Rewrites one direction (guest -> server) of one HTTP/1.x connection.
pub struct HttpRequestRewriter {
    secrets: Arc<SecretSet>,
    ctx: HostContext,
    limits: HttpLimits,
    /// Bytes received and not yet consumed (a partial head, chunk-size line, trailers).
    inbox: Vec<u8>,
    state: State,
    /// Where the search for the end of the current head resumes.
    head_searched: usize,
    /// The partial head is checked for being HTTP at all when it reaches this length.
    head_check_at: usize,
    failed: Option<StreamError>,
}

/// Shows where the stream is, not the bytes held.
impl std::fmt::Debug for HttpRequestRewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Head => "head",
            State::Body(b) => match b.framing {
                Framing::Length { .. } => "body (content-length)",
                Framing::Held(_) => "body (held for substitution)",
                Framing::Chunked { .. } => "body (chunked)",
            },
            State::Raw(_) => "raw",
        };
        f.debug_struct("HttpRequestRewriter")
            .field("ctx", &self.ctx)
            .field("state", &state)
            .field("buffered", &self.buffered())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

enum State {
    /// Waiting for a complete request head.
    Head,
    /// Inside a request's body.
    Body(Box<Body>),
    /// Not parsed as HTTP any more: scanned only.
    Raw(PlaceholderScanner),
}

struct Body {
    judge: Judge,
    framing: Framing,
    /// After the body: the next head, or a raw stream (CONNECT, Upgrade).
    then_raw: bool,
}

enum Framing {
    /// Content-Length, passed through as it arrives and scanned.
    Length { remaining: u64, scan: ScanState },
    /// Content-Length, held whole with its head for substitution.
    Held(HeldRequest),
    /// Chunked; `rewrite` when a body secret may be replaced (then re-chunked).
    Chunked {
        phase: ChunkPhase,
        scan: ScanState,
        rewrite: Option<Substituter>,
    },
}

struct HeldRequest {
    head: Vec<u8>,
    edits: Vec<Edit>,
    /// The Content-Length field values, rewritten once the body is known.
    length_fields: Vec<Range<usize>>,
    length: usize,
    body: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkPhase {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// A byte range of a buffer and what replaces it.
struct Edit {
    range: Range<usize>,
    with: Vec<u8>,
}

/// The host of one request, judged once against the connection.
#[derive(Clone, Debug)]
struct Judge {
    /// `Ok(name)`: bound to the destination; `Err(reason)`: no secret may go to it.
    host: Result<String, ViolationReason>,
    shown: String,
    port: u16,
}

enum Verdict {
    Substitute,
    Leave,
    Violation(Violation),
}

impl Judge {
    fn verdict(&self, set: &SecretSet, i: usize, part: Option<SubstitutePart>) -> Verdict {
        let secret = set.secret(i);
        let reason = match &self.host {
            Ok(name) if secret.allows(name) => {
                return if part.is_some_and(|p| secret.substitutes_in(p)) {
                    Verdict::Substitute
                } else {
                    Verdict::Leave
                };
            }
            Ok(_) => ViolationReason::HostNotAllowed,
            Err(reason) => *reason,
        };
        Verdict::Violation(Violation {
            secret: secret.env_var.clone(),
            host: self.shown.clone(),
            port: self.port,
            action: secret.action,
            reason,
        })
    }

    /// Whether some secret's placeholder would be replaced in the body.
    fn body_substitutes(&self, set: &SecretSet) -> bool {
        (0..set.len()).any(|i| {
            matches!(
                self.verdict(set, i, Some(SubstitutePart::Body)),
                Verdict::Substitute
            )
        })
    }

    /// Scans bytes that pass unchanged: a placeholder there is left or a violation.
    fn scan(
        &self,
        set: &SecretSet,
        state: &mut ScanState,
        data: &[u8],
        part: Option<SubstitutePart>,
    ) -> Result<(), Violation> {
        for &b in data {
            if let Some(i) = set.step(state, b) {
                if let Verdict::Violation(v) = self.verdict(set, i, part) {
                    return Err(v);
                }
            }
        }
        Ok(())
    }
}

/// The most severe of some violations (the first among equals).
fn worst(violations: Vec<Violation>) -> Option<Violation> {
    let mut best: Option<Violation> = None;
    for v in violations {
        if best.as_ref().is_none_or(|b| v.action > b.action) {
            best = Some(v);
        }
    }
    best
}

/// A body rewritten as a stream: the stream's unsent tail (less than the longest
/// placeholder) and the automaton's state.
struct Substituter {
    state: ScanState,
    pending: Vec<u8>,
    /// What the values may still add to this body.
    growth: Growth,
}

/// What the values may still add to one part of a request (its head, its body) before the part
/// passes its bound. Charged as the values are found, so that a part full of placeholders never
/// has all its values copied before it is refused.
struct Growth {
    left: usize,
    over: bool,
    /// The bound's limit name and value, for the refusal.
    name: &'static str,
    limit: usize,
}

impl Growth {
    /// The room a part of `used` bytes has under `limit`.
    fn new(name: &'static str, limit: usize, used: usize) -> Growth {
        Growth {
            left: limit.saturating_sub(used),
            over: false,
            name,
            limit,
        }
    }

    /// Whether a `value_len`-byte value may replace `placeholder_len` bytes; once one may not,
    /// none may.
    fn take(&mut self, value_len: usize, placeholder_len: usize) -> bool {
        match self
            .left
            .checked_sub(value_len.saturating_sub(placeholder_len))
        {
            Some(left) if !self.over => {
                self.left = left;
                true
            }
            _ => {
                self.over = true;
                false
            }
        }
    }

    /// The refusal, if a value did not fit.
    fn check(&self) -> Result<(), Refusal> {
        if self.over {
            Err(Refusal::ValuesTooLarge(self.name, self.limit))
        } else {
            Ok(())
        }
    }
}

impl Substituter {
    fn feed(
        &mut self,
        set: &SecretSet,
        judge: &Judge,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), StreamError> {
        let keep = set.longest_placeholder().saturating_sub(1);
        // Positions count through `pending` then `data`; everything before `sent` is out.
        let held = self.pending.len();
        let mut sent = 0;
        let emit = |from: usize, to: usize, pending: &[u8], out: &mut Vec<u8>| {
            if from < held {
                out.extend_from_slice(&pending[from..to.min(held)]);
            }
            if to > held {
                out.extend_from_slice(&data[from.max(held) - held..to - held]);
            }
        };
        for (i, &b) in data.iter().enumerate() {
            let Some(secret) = set.step(&mut self.state, b) else {
                continue;
            };
            let end = held + i + 1;
            // A placeholder that began inside the last one found (whose bytes may be long
            // sent) is cut by it: it is judged, but nothing of it is replaced.
            let start = end
                .checked_sub(set.secret(secret).placeholder.len())
                .filter(|start| *start >= sent);
            match judge.verdict(set, secret, Some(SubstitutePart::Body)) {
                Verdict::Violation(v) => return Err(v.into()),
                Verdict::Substitute => {
                    let Some(start) = start else { continue };
                    let value = &set.secret(secret).value;
                    if !self.growth.take(value.len(), end - start) {
                        self.growth.check()?;
                    }
                    emit(sent, start, &self.pending, out);
                    out.extend_from_slice(value);
                }
                Verdict::Leave => emit(sent, end, &self.pending, out),
            }
            sent = end;
        }
        let total = held + data.len();
        let hold_from = sent.max(total.saturating_sub(keep));
        emit(sent, hold_from, &self.pending, out);
        let mut rest = Vec::with_capacity(total - hold_from);
        if hold_from < held {
            rest.extend_from_slice(&self.pending[hold_from..]);
        }
        rest.extend_from_slice(&data[hold_from.max(held) - held..]);
        self.pending = rest;
        Ok(())
    }

    fn flush(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.pending);
    }
}

/// Appends `data` as one chunk (nothing for no data: a zero chunk would end the body).
fn put_chunk(data: &[u8], out: &mut Vec<u8>) {
    if !data.is_empty() {
        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
}

/// How long `len` bytes become with `edits` (disjoint ranges within them) applied.
fn edited_len(len: usize, edits: &[Edit]) -> usize {
    edits.iter().fold(len, |n, e| {
        n.saturating_sub(e.range.len()).saturating_add(e.with.len())
    })
}

/// Applies non-overlapping edits (sorted here) to `buf`.
fn apply_edits(buf: &[u8], edits: &mut [Edit]) -> Vec<u8> {
    edits.sort_by_key(|e| e.range.start);
    let mut out = Vec::with_capacity(buf.len());
    let mut at = 0;
    for e in edits.iter() {
        if e.range.start < at || e.range.end > buf.len() {
            // Placeholders that overlap: the first one's edit wins, the other is cut by it.
            continue;
        }
        out.extend_from_slice(&buf[at..e.range.start]);
        out.extend_from_slice(&e.with);
        at = e.range.end;
    }
    out.extend_from_slice(&buf[at..]);
    out
}

/// Where `part` (a sub-slice of `base`, as httparse hands out) lies in `base`.
fn span(base: &[u8], part: &[u8]) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(base.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= base.len()).then_some(start..end)
}

/// The end of a request head (just past its blank line) in `buf`, searching from `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from.saturating_sub(2);
    while let Some(off) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let nl = i + off;
        match buf.get(nl + 1..nl + 3) {
            Some([b'\n', _]) => return Some(nl + 2),
            Some([b'\r', b'\n']) => return Some(nl + 3),
            None if buf.get(nl + 1) == Some(&b'\n') => return Some(nl + 2),
            _ => {}
        }
        i = nl + 1;
    }
    None
}

/// `host[:port]` -> (normalized name, port). `None` for anything that is not a domain name
/// (an IP literal, a single label, junk, an empty or bad port).
fn parse_authority(raw: &[u8]) -> Option<(String, Option<u16>)> {
    let s = std::str::from_utf8(raw).ok()?.trim();
    if s.starts_with('[') {
        return None;
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse::<u16>().ok()?)),
        None => (s, None),
    };
    let name = crate::policy::parse_domain(host).ok()?;
    Some((name, port))
}

/// Whether a request target leaves the request to the host in `Host`, `name` on `port`: an
/// origin-form target (`/path`), `*`, or CONNECT's authority; or an absolute-form `http` or
/// `https` target naming that host and port. Any other target (another scheme, a bare
/// authority) names something else: servers route by an absolute-form target over `Host`
/// (RFC 9112 3.2.2), and some (nginx) take the host of any `scheme://host` target.
fn target_agrees(method: &str, target: &str, name: &str, port: u16) -> bool {
    if target.starts_with('/') || target == "*" || method.eq_ignore_ascii_case("CONNECT") {
        return true;
    }
    absolute_authority(target)
        .and_then(|a| parse_authority(a.as_bytes()))
        .is_some_and(|(n, p)| n == name && p.is_none_or(|p| p == port))
}

/// The authority of an absolute-form target (`http://host:port/path`), if it is one.
fn absolute_authority(target: &str) -> Option<&str> {
    let lower = target.get(..8)?.to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        &target[7..]
    } else if lower.starts_with("https://") {
        &target[8..]
    } else {
        return None;
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// What parsing a complete head led to.
enum HeadOutcome {
    /// Not an HTTP/1.x request: the stream is scanned raw from here on.
    NotHttp,
    /// A request: `emit` goes out now, then `next`.
    Request { emit: Vec<u8>, next: State },
}

impl HttpRequestRewriter {
    /// A rewriter for one connection. `ctx` says what binds the connection to a name.
    pub fn new(secrets: Arc<SecretSet>, ctx: HostContext, limits: HttpLimits) -> Self {
        let ctx = HostContext {
            sni: ctx.sni.as_deref().map(normalize_name),
            resolved_names: ctx
                .resolved_names
                .iter()
                .map(|n| normalize_name(n))
                .collect(),
            ..ctx
        };
        HttpRequestRewriter {
            secrets,
            ctx,
            limits,
            inbox: Vec::new(),
            state: State::Head,
            head_searched: 0,
            head_check_at: 1,
            failed: None,
        }
    }

    /// Takes the next bytes the guest sent and appends what may go to the server to `out`
    /// (less what is held: a partial head, a body held for substitution, a placeholder's
    /// length of a rewritten chunked body). On an error the connection must be reset and
    /// nothing this call appended sent; every later call returns the same error.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.run(input, out);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
            self.inbox = Vec::new();
            self.state = State::Head;
        }
        result
    }

    /// The guest closed its side: whatever is held goes out as it is (scanned, not
    /// substituted: the last request is incomplete). No `push` may follow.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let inbox = std::mem::take(&mut self.inbox);
        let result = self.finish_inner(&inbox, out);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    /// Bytes held now: never more than `http-header-bytes` (a head or trailers),
    /// `secret-body-bytes` plus a head (a held body), [`MAX_CHUNK_LINE`] or a placeholder.
    pub fn buffered(&self) -> usize {
        let held = match &self.state {
            State::Body(b) => match &b.framing {
                Framing::Held(h) => h.head.len() + h.body.len(),
                Framing::Chunked {
                    rewrite: Some(s), ..
                } => s.pending.len(),
                _ => 0,
            },
            _ => 0,
        };
        self.inbox.len() + held
    }

    fn run(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
        if self.inbox.is_empty() {
            if let State::Raw(scanner) = &mut self.state {
                scanner.scan(input)?;
                out.extend_from_slice(input);
                return Ok(());
            }
        }
        let mut inbox = std::mem::take(&mut self.inbox);
        inbox.extend_from_slice(input);
        let mut pos = 0;
        let result = loop {
            match self.step(&inbox, &mut pos, out) {
                Ok(true) => continue,
                Ok(false) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        inbox.drain(..pos);
        self.inbox = inbox;
        result
    }

    /// One step of the state machine over `inbox[*pos..]`; false when it needs more input.
    fn step(
        &mut self,
        inbox: &[u8],
        pos: &mut usize,
        out: &mut Vec<u8>,
    ) -> Result<bool, StreamError> {
        let avail = &inbox[*pos..];
        if avail.is_empty() {
            return Ok(false);
        }
        let set = self.secrets.clone();
        match &mut self.state {
            State::Raw(scanner) => {
                scanner.scan(avail)?;
                out.extend_from_slice(avail);
                *pos = inbox.len();
                Ok(false)
            }
            State::Head => self.head_step(inbox, pos, out),
            State::Body(body) => {
                let before = *pos;
                let done = body_step(&set, &self.limits, body, avail, pos, out)?;
                if done {
                    self.state = if body.then_raw {
                        State::Raw(PlaceholderScanner::new(set, &self.ctx))
                    } else {
                        State::Head
                    };
                }
                Ok(done || *pos > before)
            }
        }
    }

    fn head_step(
        &mut self,
        inbox: &[u8],
        pos: &mut usize,
        out: &mut Vec<u8>,
    ) -> Result<bool, StreamError> {
        // Blank lines between requests pass as they are (servers skip them).
        let mut avail = &inbox[*pos..];
        while let [b'\r' | b'\n', ..] = avail {
            out.push(avail[0]);
            *pos += 1;
            avail = &avail[1..];
        }
        if avail.is_empty() {
            return Ok(false);
        }
        let Some(end) = head_end(avail, self.head_searched) else {
            if avail.len() > self.limits.header_bytes {
                return self.head_too_large(inbox, pos, out);
            }
            self.head_searched = avail.len();
            if avail.len() >= self.head_check_at {
                // Re-checked at doubling lengths: O(n) in all for a head that trickles in.
                self.head_check_at = avail.len().saturating_mul(2);
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                match httparse::Request::new(&mut fields).parse(avail) {
                    Ok(_) => {}
                    Err(httparse::Error::TooManyHeaders) => {
                        return Err(Refusal::TooManyHeaders.into())
                    }
                    Err(_) => {
                        self.enter_raw(avail, out)?;
                        *pos = inbox.len();
                    }
                }
            }
            return Ok(false);
        };
        if end > self.limits.header_bytes {
            return self.head_too_large(inbox, pos, out);
        }
        self.head_searched = 0;
        self.head_check_at = 1;
        let head = &avail[..end];
        match self.process_head(head)? {
            HeadOutcome::NotHttp => {
                self.enter_raw(avail, out)?;
                *pos = inbox.len();
                Ok(false)
            }
            HeadOutcome::Request { emit, next } => {
                out.extend_from_slice(&emit);
                *pos += end;
                self.state = next;
                Ok(true)
            }
        }
    }

    /// The head at `inbox[*pos..]` runs past `http-header-bytes`. It is refused if it may be
    /// HTTP, and the stream is scanned raw if it is not. Judged on its first
    /// `http-header-bytes + 1` bytes, like the checks of a partial head (which see at most
    /// that many), so the verdict does not depend on how the stream was cut: a non-HTTP
    /// stream sent in one piece longer than the limit is scanned like one that trickles in.
    fn head_too_large(
        &mut self,
        inbox: &[u8],
        pos: &mut usize,
        out: &mut Vec<u8>,
    ) -> Result<bool, StreamError> {
        let limit = self.limits.header_bytes;
        let avail = &inbox[*pos..];
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::Request::new(&mut fields).parse(&avail[..avail.len().min(limit + 1)]) {
            Err(httparse::Error::TooManyHeaders) => Err(Refusal::TooManyHeaders.into()),
            Err(_) => {
                self.enter_raw(avail, out)?;
                *pos = inbox.len();
                Ok(false)
            }
            Ok(_) => Err(Refusal::HeadTooLarge(limit).into()),
        }
    }

    /// From here on the stream is scanned only; `rest` (already received) goes out now.
    fn enter_raw(&mut self, rest: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
        let mut scanner = PlaceholderScanner::new(self.secrets.clone(), &self.ctx);
        scanner.scan(rest)?;
        out.extend_from_slice(rest);
        self.state = State::Raw(scanner);
        Ok(())
    }

    /// Judges the request's host against the connection.
    fn judge(&self, fields: &[httparse::Header<'_>], method: &str, target: &str) -> Judge {
        let hosts: Vec<&[u8]> = fields
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case("host"))
            .map(|f| f.value)
            .collect();
        let mut judge = Judge {
            host: Err(ViolationReason::NoHost),
            shown: hosts
                .first()
                .map(|h| printable(h))
                .unwrap_or_else(|| context_host(&self.ctx)),
            port: self.ctx.port,
        };
        let [host] = hosts[..] else {
            return judge;
        };
        let Some((name, port)) = parse_authority(host) else {
            return judge;
        };
        judge.shown = name.clone();
        let mismatch = |m| Err(ViolationReason::HostMismatch(m));
        judge.host = if port.is_some_and(|p| p != self.ctx.port) {
            mismatch(Mismatch::Port)
        } else if !target_agrees(method, target, &name, self.ctx.port) {
            mismatch(Mismatch::Target)
        } else if self.ctx.sni.as_ref().is_some_and(|s| *s != name) {
            mismatch(Mismatch::Sni)
        } else if !self.ctx.resolved_names.is_empty() && !self.ctx.resolved_names.contains(&name) {
            mismatch(Mismatch::ResolvedNames)
        } else if (self.ctx.sni.is_some() && self.ctx.sni_verified)
            || self.ctx.resolved_names.contains(&name)
        {
            Ok(name)
        } else {
            Err(ViolationReason::HostUnverified)
        };
        judge
    }

    /// Parses, judges and rewrites one complete head; decides how its body is carried.
    fn process_head(&self, head: &[u8]) -> Result<HeadOutcome, StreamError> {
        let set = &*self.secrets;
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut storage);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Ok(HeadOutcome::NotHttp),
            Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooManyHeaders.into()),
            Err(_) => return Ok(HeadOutcome::NotHttp),
        }
        let method = req.method.unwrap_or("");
        let target = req.path.unwrap_or("");
        let fields: &[httparse::Header<'_>] = req.headers;
        let judge = self.judge(fields, method, target);

        // Where each placeholder is: a field value (and which), the query, or elsewhere.
        let target_span = span(head, target.as_bytes()).unwrap_or(0..0);
        let query = target.find('?').map(|q| {
            let end = target.find('#').filter(|h| *h > q).unwrap_or(target.len());
            target_span.start + q + 1..target_span.start + end
        });
        let values: Vec<Option<Range<usize>>> =
            fields.iter().map(|f| span(head, f.value)).collect();
        let mut edits = Vec::new();
        let mut violations = Vec::new();
        let mut literal_in_field = vec![false; fields.len()];
        let mut growth = Growth::new("http-header-bytes", self.limits.header_bytes, head.len());
        for found in set.find_all(head) {
            let at = found.start..found.end;
            let field = values.iter().position(|v| {
                v.as_ref()
                    .is_some_and(|v| v.start <= at.start && at.end <= v.end)
            });
            let part = if let Some(f) = field {
                literal_in_field[f] = true;
                Some(SubstitutePart::Headers)
            } else if query
                .as_ref()
                .is_some_and(|q| q.start <= at.start && at.end <= q.end)
            {
                Some(SubstitutePart::Query)
            } else {
                None
            };
            match judge.verdict(set, found.secret, part) {
                Verdict::Violation(v) => violations.push(v),
                Verdict::Leave => {}
                Verdict::Substitute => {
                    let secret = set.secret(found.secret);
                    let with = if part == Some(SubstitutePart::Query) {
                        &secret.value_query
                    } else {
                        &secret.value
                    };
                    if growth.take(with.len(), at.len()) {
                        edits.push(Edit {
                            range: at,
                            with: with.to_vec(),
                        });
                    }
                }
            }
        }
        // Basic credentials: the placeholder is inside the base64 text.
        for (f, field) in fields.iter().enumerate() {
            let is_auth = field.name.eq_ignore_ascii_case("authorization")
                || field.name.eq_ignore_ascii_case("proxy-authorization");
            let (true, false, Some(value_at)) = (is_auth, literal_in_field[f], &values[f]) else {
                continue;
            };
            if let Some(edit) = self.basic_credentials(
                &judge,
                field.value,
                value_at.start,
                &mut violations,
                &mut growth,
            ) {
                edits.push(edit);
            }
        }
        if let Some(v) = worst(violations) {
            return Err(v.into());
        }
        growth.check()?;
        // Basic credentials grow by a third more, encoded: the whole head is checked too.
        let limit = self.limits.header_bytes;
        if edited_len(head.len(), &edits) > limit {
            return Err(Refusal::ValuesTooLarge("http-header-bytes", limit).into());
        }

        // Framing, as the server will see it.
        let mut codings: Vec<String> = Vec::new();
        let mut has_te = false;
        let mut lengths: Vec<u64> = Vec::new();
        let mut length_fields = Vec::new();
        let mut bad_length = false;
        for (f, field) in fields.iter().enumerate() {
            if field.name.eq_ignore_ascii_case("transfer-encoding") {
                has_te = true;
                let text = String::from_utf8_lossy(field.value).to_ascii_lowercase();
                codings.extend(
                    text.split(',')
                        .map(str::trim)
                        .filter(|c| !c.is_empty())
                        .map(String::from),
                );
            } else if field.name.eq_ignore_ascii_case("content-length") {
                length_fields.extend(values[f].clone());
                for item in field.value.split(|&b| b == b',') {
                    let item = item.trim_ascii();
                    let n = (!item.is_empty()
                        && item.len() <= 19
                        && item.iter().all(u8::is_ascii_digit))
                    .then(|| std::str::from_utf8(item).ok()?.parse::<u64>().ok())
                    .flatten();
                    match n {
                        Some(n) => lengths.push(n),
                        None => bad_length = true,
                    }
                }
            }
        }
        let connect = method.eq_ignore_ascii_case("CONNECT");
        let then_raw = connect
            || fields
                .iter()
                .any(|f| f.name.eq_ignore_ascii_case("upgrade"));
        let raw_state = || State::Raw(PlaceholderScanner::new(self.secrets.clone(), &self.ctx));
        if connect {
            // Whatever follows the head is the tunnel's payload.
            return Ok(HeadOutcome::Request {
                emit: apply_edits(head, &mut edits),
                next: raw_state(),
            });
        }
        let chunked = if has_te {
            if !lengths.is_empty() || bad_length {
                return Err(Refusal::Framing("Content-Length with Transfer-Encoding").into());
            }
            if codings.last().map(String::as_str) != Some("chunked") {
                return Err(Refusal::Framing(
                    "a Transfer-Encoding whose last coding is not chunked",
                )
                .into());
            }
            true
        } else {
            false
        };
        if bad_length || lengths.windows(2).any(|w| w[0] != w[1]) {
            return Err(Refusal::Framing("an invalid or conflicting Content-Length").into());
        }
        let length = lengths.first().copied().unwrap_or(0);
        let substitutes = judge.body_substitutes(set);
        let body = |framing| {
            State::Body(Box::new(Body {
                judge: judge.clone(),
                framing,
                then_raw,
            }))
        };
        let next = if chunked {
            body(Framing::Chunked {
                phase: ChunkPhase::Size,
                scan: set.start(),
                rewrite: substitutes.then(|| Substituter {
                    state: set.start(),
                    pending: Vec::new(),
                    growth: Growth::new("secret-body-bytes", self.limits.body_bytes, 0),
                }),
            })
        } else if length == 0 {
            if then_raw {
                raw_state()
            } else {
                State::Head
            }
        } else if substitutes {
            let limit = self.limits.body_bytes;
            let length = usize::try_from(length)
                .ok()
                .filter(|l| *l <= limit)
                .ok_or(Refusal::BodyTooLarge(length, limit))?;
            // Nobody would answer the client's Expect: the head waits for the body here.
            for (f, field) in fields.iter().enumerate() {
                if field.name.eq_ignore_ascii_case("expect") {
                    if let Some(line) =
                        field_line(head, span(head, field.name.as_bytes()), values[f].clone())
                    {
                        edits.push(Edit {
                            range: line,
                            with: Vec::new(),
                        });
                    }
                }
            }
            return Ok(HeadOutcome::Request {
                emit: Vec::new(),
                next: body(Framing::Held(HeldRequest {
                    head: head.to_vec(),
                    edits,
                    length_fields,
                    length,
                    body: Vec::with_capacity(length.min(64 * 1024)),
                })),
            });
        } else {
            body(Framing::Length {
                remaining: length,
                scan: set.start(),
            })
        };
        Ok(HeadOutcome::Request {
            emit: apply_edits(head, &mut edits),
            next,
        })
    }

    /// `Basic <base64>`: placeholders in the decoded `user:pass`. Returns the edit of the
    /// base64 text when one is replaced; violations are added to `violations`.
    fn basic_credentials(
        &self,
        judge: &Judge,
        value: &[u8],
        value_at: usize,
        violations: &mut Vec<Violation>,
        growth: &mut Growth,
    ) -> Option<Edit> {
        let set = &*self.secrets;
        let scheme_end = value.iter().position(|&b| b == b' ')?;
        if !value[..scheme_end].eq_ignore_ascii_case(b"basic") {
            return None;
        }
        let token_start = scheme_end + value[scheme_end..].iter().position(|&b| b != b' ')?;
        let token = value[token_start..].trim_ascii_end();
        let decoded = zeroize::Zeroizing::new(BASIC_DECODE.decode(token).ok()?);
        let mut edits = Vec::new();
        for found in set.find_all(&decoded) {
            match judge.verdict(set, found.secret, Some(SubstitutePart::Headers)) {
                Verdict::Violation(v) => violations.push(v),
                Verdict::Leave => {}
                Verdict::Substitute => {
                    let value = &set.secret(found.secret).value;
                    if growth.take(value.len(), found.end - found.start) {
                        edits.push(Edit {
                            range: found.start..found.end,
                            with: value.to_vec(),
                        });
                    }
                }
            }
        }
        if edits.is_empty() {
            return None;
        }
        let plain = zeroize::Zeroizing::new(apply_edits(&decoded, &mut edits));
        let start = value_at + token_start;
        Some(Edit {
            range: start..start + token.len(),
            with: STANDARD.encode(&*plain).into_bytes(),
        })
    }

    fn finish_inner(&mut self, inbox: &[u8], out: &mut Vec<u8>) -> Result<(), StreamError> {
        let set = self.secrets.clone();
        let mut raw = PlaceholderScanner::new(set.clone(), &self.ctx);
        match std::mem::replace(&mut self.state, State::Head) {
            State::Body(mut body) => match &mut body.framing {
                Framing::Held(held) => {
                    let mut scan = set.start();
                    body.judge
                        .scan(&set, &mut scan, &held.body, Some(SubstitutePart::Body))?;
                    out.extend_from_slice(&apply_edits(&held.head, &mut held.edits));
                    out.extend_from_slice(&held.body);
                }
                Framing::Chunked {
                    rewrite: Some(sub), ..
                } => {
                    let mut rest = Vec::new();
                    sub.flush(&mut rest);
                    put_chunk(&rest, out);
                }
                _ => {}
            },
            State::Raw(scanner) => raw = scanner,
            State::Head => {}
        }
        raw.scan(inbox)?;
        out.extend_from_slice(inbox);
        Ok(())
    }
}

/// The whole line of a header field (name to line end, its LF included).
fn field_line(
    head: &[u8],
    name: Option<Range<usize>>,
    value: Option<Range<usize>>,
) -> Option<Range<usize>> {
    let start = name?.start;
    let after = value.map(|v| v.end).unwrap_or(start);
    let nl = head.get(after..)?.iter().position(|&b| b == b'\n')?;
    Some(start..after + nl + 1)
}

/// One step inside a body; true when the body is complete.
fn body_step(
    set: &SecretSet,
    limits: &HttpLimits,
    body: &mut Body,
    avail: &[u8],
    pos: &mut usize,
    out: &mut Vec<u8>,
) -> Result<bool, StreamError> {
    let judge = &body.judge;
    match &mut body.framing {
        Framing::Length { remaining, scan } => {
            let n = avail
                .len()
                .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
            judge.scan(set, scan, &avail[..n], Some(SubstitutePart::Body))?;
            out.extend_from_slice(&avail[..n]);
            *pos += n;
            *remaining -= n as u64;
            Ok(*remaining == 0)
        }
        Framing::Held(held) => {
            let n = avail.len().min(held.length - held.body.len());
            held.body.extend_from_slice(&avail[..n]);
            *pos += n;
            if held.body.len() < held.length {
                return Ok(false);
            }
            let mut edits = Vec::new();
            let mut violations = Vec::new();
            let mut growth = Growth::new("secret-body-bytes", limits.body_bytes, 0);
            for found in set.find_all(&held.body) {
                match judge.verdict(set, found.secret, Some(SubstitutePart::Body)) {
                    Verdict::Violation(v) => violations.push(v),
                    Verdict::Leave => {}
                    Verdict::Substitute => {
                        let value = &set.secret(found.secret).value;
                        if growth.take(value.len(), found.end - found.start) {
                            edits.push(Edit {
                                range: found.start..found.end,
                                with: value.to_vec(),
                            });
                        }
                    }
                }
            }
            if let Some(v) = worst(violations) {
                return Err(v.into());
            }
            growth.check()?;
            let new_body = apply_edits(&held.body, &mut edits);
            let length = new_body.len().to_string();
            for range in held.length_fields.drain(..) {
                held.edits.push(Edit {
                    range,
                    with: length.clone().into_bytes(),
                });
            }
            out.extend_from_slice(&apply_edits(&held.head, &mut held.edits));
            out.extend_from_slice(&new_body);
            Ok(true)
        }
        Framing::Chunked {
            phase,
            scan,
            rewrite,
        } => chunk_step(set, limits, judge, phase, scan, rewrite, avail, pos, out),
    }
}

#[allow(clippy::too_many_arguments)]
fn chunk_step(
    set: &SecretSet,
    limits: &HttpLimits,
    judge: &Judge,
    phase: &mut ChunkPhase,
    scan: &mut ScanState,
    rewrite: &mut Option<Substituter>,
    avail: &[u8],
    pos: &mut usize,
    out: &mut Vec<u8>,
) -> Result<bool, StreamError> {
    match *phase {
        ChunkPhase::Size => {
            let Some(nl) = avail
                .iter()
                .take(MAX_CHUNK_LINE + 1)
                .position(|&b| b == b'\n')
            else {
                if avail.len() > MAX_CHUNK_LINE {
                    return Err(Refusal::BadChunk("chunk-size line too long").into());
                }
                return Ok(false);
            };
            let line = &avail[..nl];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let digits = line
                .split(|&b| b == b';')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
                return Err(Refusal::BadChunk("bad chunk size").into());
            }
            let size = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| u64::from_str_radix(d, 16).ok())
                .ok_or(Refusal::BadChunk("bad chunk size"))?;
            // A placeholder in an extension is never replaced.
            judge.scan(set, &mut set.start(), line, None)?;
            match rewrite {
                None => out.extend_from_slice(&avail[..=nl]),
                Some(sub) if size == 0 => {
                    let mut rest = Vec::new();
                    sub.flush(&mut rest);
                    put_chunk(&rest, out);
                    out.extend_from_slice(b"0\r\n");
                }
                Some(_) => {}
            }
            *pos += nl + 1;
            *phase = if size == 0 {
                ChunkPhase::Trailers
            } else {
                ChunkPhase::Data(size)
            };
            Ok(false)
        }
        ChunkPhase::Data(remaining) => {
            let n = avail
                .len()
                .min(usize::try_from(remaining).unwrap_or(usize::MAX));
            let data = &avail[..n];
            match rewrite {
                None => {
                    judge.scan(set, scan, data, Some(SubstitutePart::Body))?;
                    out.extend_from_slice(data);
                }
                Some(sub) => {
                    let mut chunk = Vec::with_capacity(n);
                    sub.feed(set, judge, data, &mut chunk)?;
                    put_chunk(&chunk, out);
                }
            }
            *pos += n;
            let left = remaining - n as u64;
            *phase = if left == 0 {
                ChunkPhase::DataEnd
            } else {
                ChunkPhase::Data(left)
            };
            Ok(false)
        }
        ChunkPhase::DataEnd => match avail {
            [b'\r', b'\n', ..] => {
                if rewrite.is_none() {
                    out.extend_from_slice(b"\r\n");
                }
                *pos += 2;
                *phase = ChunkPhase::Size;
                Ok(false)
            }
            [b'\r'] => Ok(false),
            _ => Err(Refusal::BadChunk("chunk data not followed by CRLF").into()),
        },
        ChunkPhase::Trailers => {
            let end = match avail {
                [b'\n', ..] => Some(1),
                [b'\r', b'\n', ..] => Some(2),
                [b'\r'] => None,
                _ => head_end(avail, 0),
            };
            let Some(end) = end else {
                if avail.len() > limits.header_bytes {
                    return Err(Refusal::BadChunk("trailer fields too long").into());
                }
                return Ok(false);
            };
            let trailers = &avail[..end];
            judge.scan(set, &mut set.start(), trailers, None)?;
            out.extend_from_slice(trailers);
            *pos += end;
            Ok(true)
        }
    }
}
