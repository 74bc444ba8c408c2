//! The server name of a TLS ClientHello, read strictly.
//!
//! The datapath completes the guest's TCP handshake, buffers what the guest sends first, and
//! calls [`scan_client_hello`] with everything buffered so far after every read, until the
//! answer is not [`ClientHelloScan::NeedMore`]. The bytes are then replayed upstream unchanged.
//!
//! Theory of operation. A cheap look at the first bytes (record type handshake, version 3.x,
//! handshake type client_hello) tells TLS from other protocols, so that plain HTTP on port 443
//! is [`ClientHelloScan::NotTls`] at once. Then the handshake records are joined (a ClientHello
//! may span records, a record may arrive in pieces) until the ClientHello message is complete,
//! and the message is parsed field by field with bounds checks: the fixed fields, then every
//! extension. The scan is bounded: at most `max_bytes` are looked at.
//!
//! The scan never picks a name when the hello is not clear about it, because a policy that
//! judges by name must judge the name the server will act on, and servers differ where the
//! protocol is violated: two server_name extensions or several host names in one list are
//! [`ClientHelloScan::Ambiguous`]; a list that does not add up, an entry of an unknown name
//! type, a name that is not a host name (RFC 6066 forbids IP literals), a duplicate extension,
//! bytes left over inside the extensions or a record that cannot carry a handshake are
//! [`ClientHelloScan::Malformed`]. A well-formed hello without a server_name is
//! [`ClientHelloScan::NoSni`], a distinct answer the caller decides on.

use std::collections::HashSet;
use std::net::Ipv4Addr;

/// A default bound for the bytes read while looking for a ClientHello (large post-quantum
/// key shares make a ClientHello about 2 KiB; a few records' worth is plenty).
pub const DEFAULT_MAX_CLIENT_HELLO: usize = 16 * 1024;

/// TLS record content type of handshake messages.
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Largest TLS plaintext record fragment.
const MAX_FRAGMENT: usize = 16384;
/// Record header: type, version (2), length (2).
const RECORD_HEADER: usize = 5;
/// Handshake header: type, length (3).
const HANDSHAKE_HEADER: usize = 4;
/// Extension type of server_name (RFC 6066).
const EXT_SERVER_NAME: u16 = 0;
/// Name type of a host name in a server_name list.
const NAME_TYPE_HOST_NAME: u8 = 0;

/// What the first bytes of a connection say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientHelloScan {
    /// A ClientHello has begun but is not complete: read more and scan again.
    NeedMore,
    /// A complete, well-formed ClientHello naming this host (lower case, no trailing dot).
    Sni(String),
    /// A complete, well-formed ClientHello without a server_name extension.
    NoSni,
    /// The bytes are not a TLS handshake: another protocol.
    NotTls,
    /// They begin like a ClientHello but are not a valid one; the reason says what is wrong.
    Malformed(&'static str),
    /// No complete ClientHello within `max_bytes`.
    TooLarge,
    /// A ClientHello naming more than one server (two server_name extensions, or several host
    /// names in one): servers may act on either, so no single name can be judged.
    Ambiguous(&'static str),
}

/// Scans the first bytes a client sent (all of them so far) for a ClientHello and its SNI.
pub fn scan_client_hello(buf: &[u8], max_bytes: usize) -> ClientHelloScan {
    if let Some(verdict) = precheck(buf) {
        return verdict;
    }
    let window = &buf[..buf.len().min(max_bytes)];
    match join_records(window) {
        Ok(Some(body)) => match parse_client_hello(&body) {
            Ok(verdict) => verdict,
            Err(reason) => ClientHelloScan::Malformed(reason),
        },
        Ok(None) if buf.len() >= max_bytes => ClientHelloScan::TooLarge,
        Ok(None) => ClientHelloScan::NeedMore,
        Err(reason) => ClientHelloScan::Malformed(reason),
    }
}

/// A look at the record and handshake headers, as far as they have arrived.
fn precheck(buf: &[u8]) -> Option<ClientHelloScan> {
    if buf.is_empty() {
        return Some(ClientHelloScan::NeedMore);
    }
    if buf[0] != CONTENT_HANDSHAKE {
        return Some(ClientHelloScan::NotTls);
    }
    if buf.len() >= 2 && buf[1] != 3 {
        return Some(ClientHelloScan::NotTls);
    }
    if buf.len() >= 3 && buf[2] > 4 {
        return Some(ClientHelloScan::NotTls);
    }
    if buf.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
        if len == 0 || len > MAX_FRAGMENT {
            return Some(ClientHelloScan::NotTls);
        }
    }
    if buf.len() >= 6 && buf[5] != HANDSHAKE_CLIENT_HELLO {
        return Some(ClientHelloScan::NotTls);
    }
    None
}

/// Joins the handshake records in `buf` until the first handshake message is complete and
/// returns its body; `None` while it is not complete. Bytes after the message are not looked at.
fn join_records(buf: &[u8]) -> Result<Option<Vec<u8>>, &'static str> {
    let mut message: Vec<u8> = Vec::new();
    let mut rest = buf;
    loop {
        if let Some(body) = complete_message(&message) {
            return Ok(Some(body.to_vec()));
        }
        if rest.len() < RECORD_HEADER {
            return Ok(None);
        }
        let (kind, major, minor) = (rest[0], rest[1], rest[2]);
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if kind != CONTENT_HANDSHAKE {
            return Err("a record of another type inside the ClientHello");
        }
        if major != 3 || minor > 4 {
            return Err("a record with a version other than 3.x");
        }
        if len == 0 {
            return Err("an empty handshake record");
        }
        if len > MAX_FRAGMENT {
            return Err("a record longer than 2^14 bytes");
        }
        let fragment = &rest[RECORD_HEADER..];
        let take = len.min(fragment.len());
        message.extend_from_slice(&fragment[..take]);
        rest = &fragment[take..];
        if take < len {
            // The record has not fully arrived; what has may already finish the message.
            return Ok(complete_message(&message).map(<[u8]>::to_vec));
        }
    }
}

/// The body of the handshake message at the start of `message`, if it is all there.
fn complete_message(message: &[u8]) -> Option<&[u8]> {
    let header = message.get(..HANDSHAKE_HEADER)?;
    let len = usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
    message.get(HANDSHAKE_HEADER..HANDSHAKE_HEADER + len)
}

/// A cursor over untrusted bytes; every read is bounds-checked.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], &'static str> {
        if n > self.rest.len() {
            return Err(what);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, &'static str> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, &'static str> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// Parses a ClientHello body (RFC 8446 4.1.2, RFC 5246 7.4.1.2) down to its server name.
fn parse_client_hello(body: &[u8]) -> Result<ClientHelloScan, &'static str> {
    const CUT: &str = "the ClientHello ends inside its fixed fields";
    let mut r = Reader::new(body);
    let version = r.u16(CUT)?;
    if version >> 8 != 3 {
        return Err("a legacy_version other than 3.x");
    }
    r.take(32, CUT)?; // random
    let session_id = usize::from(r.u8(CUT)?);
    if session_id > 32 {
        return Err("a session id longer than 32 bytes");
    }
    r.take(session_id, CUT)?;
    let suites = usize::from(r.u16(CUT)?);
    if suites == 0 || suites % 2 != 0 {
        return Err("a cipher suite list that is empty or of odd length");
    }
    r.take(suites, CUT)?;
    let compression = usize::from(r.u8(CUT)?);
    if compression == 0 {
        return Err("an empty compression method list");
    }
    r.take(compression, CUT)?;
    if r.is_empty() {
        // No extension block at all: allowed before TLS 1.3, and nameless.
        return Ok(ClientHelloScan::NoSni);
    }
    let block_len = usize::from(r.u16("a cut extension block length")?);
    let block = r.take(block_len, "an extension block longer than the ClientHello")?;
    if !r.is_empty() {
        return Err("bytes after the extension block");
    }
    let mut extensions = Reader::new(block);
    let mut seen: HashSet<u16> = HashSet::new();
    let mut name = None;
    while !extensions.is_empty() {
        const EXT_CUT: &str = "bytes in the extension block that are not an extension";
        let kind = extensions.u16(EXT_CUT)?;
        let len = usize::from(extensions.u16(EXT_CUT)?);
        let data = extensions.take(len, "an extension longer than the extension block")?;
        if !seen.insert(kind) {
            if kind == EXT_SERVER_NAME {
                return Ok(ClientHelloScan::Ambiguous("two server_name extensions"));
            }
            return Err("a duplicate extension");
        }
        if kind == EXT_SERVER_NAME {
            match parse_server_name(data)? {
                ServerName::One(n) => name = Some(n),
                ServerName::Several => {
                    return Ok(ClientHelloScan::Ambiguous(
                        "several host names in one server_name extension",
                    ))
                }
            }
        }
    }
    Ok(match name {
        Some(n) => ClientHelloScan::Sni(n),
        None => ClientHelloScan::NoSni,
    })
}

enum ServerName {
    One(String),
    Several,
}

/// Parses the body of a server_name extension (RFC 6066 3): a list of (name type, name) that
/// must hold exactly one host name and nothing else.
fn parse_server_name(data: &[u8]) -> Result<ServerName, &'static str> {
    let mut r = Reader::new(data);
    let list_len = usize::from(r.u16("a server_name extension without a list")?);
    let list = r.take(list_len, "a server_name list longer than its extension")?;
    if !r.is_empty() {
        return Err("bytes after the server_name list");
    }
    if list.is_empty() {
        return Err("an empty server_name list");
    }
    let mut entries = Reader::new(list);
    let mut names = Vec::new();
    while !entries.is_empty() {
        const CUT: &str = "a server_name entry cut short";
        if entries.u8(CUT)? != NAME_TYPE_HOST_NAME {
            return Err("a server_name entry of an unknown name type");
        }
        let len = usize::from(entries.u16(CUT)?);
        names.push(entries.take(len, CUT)?);
    }
    match names.as_slice() {
        [one] => host_name(one).map(ServerName::One),
        _ => Ok(ServerName::Several),
    }
}

/// Checks that `raw` is a host name (RFC 6066: ASCII, no IP literal; RFC 1123 labels, with `_`
/// tolerated as resolvers do) and returns it lower case, without a trailing dot.
fn host_name(raw: &[u8]) -> Result<String, &'static str> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    if raw.is_empty() {
        return Err("an empty host name");
    }
    if raw.len() > 253 {
        return Err("a host name longer than 253 bytes");
    }
    if raw.contains(&b':') {
        return Err("an IP address as host name");
    }
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    if !raw.iter().all(allowed) {
        return Err("a host name with a byte no host name holds");
    }
    // Only ASCII from here on.
    let name = String::from_utf8_lossy(raw).to_ascii_lowercase();
    if name.parse::<Ipv4Addr>().is_ok() {
        return Err("an IP address as host name");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("a host name with an empty label");
        }
        if label.len() > 63 {
            return Err("a host name label longer than 63 bytes");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a host name label that starts or ends with `-`");
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("a host name whose last label is numeric");
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    use super::*;

    fn config(sni: bool) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        cfg.enable_sni = sni;
        Arc::new(cfg)
    }

    /// The first flight of a rustls client, written into a buffer (no network).
    fn client_hello(server: &str, sni: bool) -> Vec<u8> {
        let name = ServerName::try_from(server.to_string()).unwrap();
        let mut conn = ClientConnection::new(config(sni), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Re-splits a single-record ClientHello into two records (a handshake message may span
    /// records; the scan must join them).
    fn split_into_two_records(hello: &[u8], at: usize) -> Vec<u8> {
        let body = &hello[5..];
        assert_eq!(
            usize::from(u16::from_be_bytes([hello[3], hello[4]])),
            body.len()
        );
        let mut out = Vec::new();
        for part in [&body[..at], &body[at..]] {
            out.extend_from_slice(&hello[..3]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    #[test]
    fn finds_sni() {
        let hello = client_hello("API.Example.com", true);
        assert_eq!(
            scan_client_hello(&hello, DEFAULT_MAX_CLIENT_HELLO),
            ClientHelloScan::Sni("api.example.com".into())
        );
    }

    #[test]
    fn no_sni_when_disabled_or_connecting_by_ip() {
        let hello = client_hello("api.example.com", false);
        assert_eq!(
            scan_client_hello(&hello, DEFAULT_MAX_CLIENT_HELLO),
            ClientHelloScan::NoSni
        );
        // A client connecting to an IP address sends no server_name at all.
        let hello = client_hello("192.0.2.7", true);
        assert_eq!(
            scan_client_hello(&hello, DEFAULT_MAX_CLIENT_HELLO),
            ClientHelloScan::NoSni
        );
    }

    #[test]
    fn every_prefix_needs_more_then_the_whole_gives_sni() {
        let hello = client_hello("split.example.org", true);
        for cut in 0..hello.len() {
            assert_eq!(
                scan_client_hello(&hello[..cut], DEFAULT_MAX_CLIENT_HELLO),
                ClientHelloScan::NeedMore,
                "prefix of {cut} bytes"
            );
        }
        assert_eq!(
            scan_client_hello(&hello, DEFAULT_MAX_CLIENT_HELLO),
            ClientHelloScan::Sni("split.example.org".into())
        );
    }

    #[test]
    fn hello_spanning_two_records() {
        let hello = client_hello("two.records.example", true);
        let two = split_into_two_records(&hello, 40);
        let first_record_end = 5 + 40;
        assert_eq!(
            scan_client_hello(&two[..first_record_end], DEFAULT_MAX_CLIENT_HELLO),
            ClientHelloScan::NeedMore
        );
        assert_eq!(
            scan_client_hello(&two, DEFAULT_MAX_CLIENT_HELLO),
            ClientHelloScan::Sni("two.records.example".into())
        );
    }

    #[test]
    fn bytes_after_the_hello_are_fine() {
        let mut hello = client_hello("more.example", true);
        hello.extend_from_slice(&[0x17, 3, 3, 0, 5, 1, 2, 3, 4, 5]);
        assert_eq!(
            scan_client_hello(&hello, DEFAULT_MAX_CLIENT_HELLO),
            ClientHelloScan::Sni("more.example".into())
        );
    }

    #[test]
    fn bounded_by_max_bytes() {
        let hello = client_hello("big.example", true);
        let max = hello.len() - 1;
        assert_eq!(
            scan_client_hello(&hello[..max - 1], max),
            ClientHelloScan::NeedMore
        );
        assert_eq!(scan_client_hello(&hello, max), ClientHelloScan::TooLarge);
        assert_eq!(
            scan_client_hello(&hello[..max], max),
            ClientHelloScan::TooLarge
        );
    }

    #[test]
    fn not_tls() {
        for data in [
            &b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"[..],
            b"SSH-2.0-OpenSSH_9.6\r\n",
            &[0x16, 0x02],                         // wrong major version
            &[0x16, 0x03, 0x01, 0x00, 0x00],       // empty record
            &[0x16, 0x03, 0x01, 0xff, 0xff],       // longer than a record can be
            &[0x16, 0x03, 0x01, 0x00, 0x10, 0x02], // a ServerHello
            &[0x17, 0x03, 0x03, 0x00, 0x10],       // application data
            &[0x80, 0x2e, 0x01, 0x03, 0x01],       // SSLv2-style hello
        ] {
            assert_eq!(
                scan_client_hello(data, DEFAULT_MAX_CLIENT_HELLO),
                ClientHelloScan::NotTls,
                "{data:?}"
            );
        }
    }

    #[test]
    fn garbage_after_a_valid_header_is_malformed() {
        let mut data = vec![0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00, 0x00, 0x3c];
        data.extend(std::iter::repeat_n(0xffu8, 0x3c));
        assert!(matches!(
            scan_client_hello(&data, DEFAULT_MAX_CLIENT_HELLO),
            ClientHelloScan::Malformed(_)
        ));
    }

    #[test]
    fn corrupted_hellos_never_panic() {
        let hello = client_hello("fuzz.example", true);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let mut data = hello.clone();
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let pos = (state as usize) % data.len();
                data[pos] = (state >> 32) as u8;
            }
            let _ = scan_client_hello(&data, DEFAULT_MAX_CLIENT_HELLO);
            let cut = (state as usize >> 8) % data.len();
            let _ = scan_client_hello(&data[..cut], DEFAULT_MAX_CLIENT_HELLO);
        }
    }

    // ---- hand-built ClientHellos, for the shapes no well-behaved client sends ----

    const SERVER_NAME: u16 = 0;
    const SUPPORTED_VERSIONS: u16 = 43;

    fn u16be(v: usize) -> [u8; 2] {
        (v as u16).to_be_bytes()
    }

    /// A server_name extension body holding these entries (type 0 = host_name).
    fn server_name_entries(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in entries {
            list.push(*kind);
            list.extend_from_slice(&u16be(name.len()));
            list.extend_from_slice(name);
        }
        let mut body = u16be(list.len()).to_vec();
        body.extend_from_slice(&list);
        body
    }

    fn server_name(name: &str) -> (u16, Vec<u8>) {
        (SERVER_NAME, server_name_entries(&[(0, name.as_bytes())]))
    }

    fn supported_versions() -> (u16, Vec<u8>) {
        (SUPPORTED_VERSIONS, vec![4, 3, 4, 3, 3])
    }

    /// The extension block: its length, then each extension (type, length, body).
    fn extension_block(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut block = Vec::new();
        for (kind, body) in extensions {
            block.extend_from_slice(&kind.to_be_bytes());
            block.extend_from_slice(&u16be(body.len()));
            block.extend_from_slice(body);
        }
        let mut out = u16be(block.len()).to_vec();
        out.extend_from_slice(&block);
        out
    }

    /// A ClientHello body (after the handshake header) with `tail` after the compression
    /// methods (usually an extension block).
    fn hello_body(tail: &[u8]) -> Vec<u8> {
        let mut b = vec![3, 3];
        b.extend_from_slice(&[0x42; 32]); // random
        b.push(32);
        b.extend_from_slice(&[0x17; 32]); // session id
        b.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]); // two cipher suites
        b.extend_from_slice(&[1, 0]); // null compression
        b.extend_from_slice(tail);
        b
    }

    /// One handshake record carrying a ClientHello with this body.
    fn record(body: &[u8]) -> Vec<u8> {
        let mut msg = vec![1, 0];
        msg.extend_from_slice(&u16be(body.len()));
        msg.extend_from_slice(body);
        let mut out = vec![22, 3, 1];
        out.extend_from_slice(&u16be(msg.len()));
        out.extend_from_slice(&msg);
        out
    }

    fn hello_with(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        record(&hello_body(&extension_block(extensions)))
    }

    fn scan(data: &[u8]) -> ClientHelloScan {
        scan_client_hello(data, DEFAULT_MAX_CLIENT_HELLO)
    }

    fn is_malformed(s: &ClientHelloScan) -> bool {
        matches!(s, ClientHelloScan::Malformed(_))
    }

    /// Re-cuts the handshake bytes of a single-record hello into records of `size` bytes.
    fn into_records_of(hello: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in hello[5..].chunks(size) {
            out.extend_from_slice(&hello[..3]);
            out.extend_from_slice(&u16be(part.len()));
            out.extend_from_slice(part);
        }
        out
    }

    #[test]
    fn hand_built_hello_with_a_name() {
        let hello = hello_with(&[supported_versions(), server_name("Hand.Example.")]);
        assert_eq!(scan(&hello), ClientHelloScan::Sni("hand.example".into()));
        let hello = hello_with(&[server_name("intranet")]);
        assert_eq!(scan(&hello), ClientHelloScan::Sni("intranet".into()));
    }

    #[test]
    fn well_formed_hellos_without_a_name() {
        assert_eq!(
            scan(&hello_with(&[supported_versions()])),
            ClientHelloScan::NoSni
        );
        // No extension block at all (an old TLS 1.0 client).
        assert_eq!(scan(&record(&hello_body(&[]))), ClientHelloScan::NoSni);
    }

    #[test]
    fn two_server_name_extensions_are_ambiguous() {
        let hello = hello_with(&[
            server_name("allowed.example"),
            supported_versions(),
            server_name("denied.example"),
        ]);
        assert!(
            matches!(scan(&hello), ClientHelloScan::Ambiguous(_)),
            "{:?}",
            scan(&hello)
        );
    }

    #[test]
    fn several_host_names_in_one_list_are_ambiguous() {
        let body = server_name_entries(&[(0, b"allowed.example"), (0, b"denied.example")]);
        let hello = hello_with(&[(SERVER_NAME, body)]);
        assert!(
            matches!(scan(&hello), ClientHelloScan::Ambiguous(_)),
            "{:?}",
            scan(&hello)
        );
    }

    #[test]
    fn names_that_are_not_host_names_are_malformed() {
        for name in [
            "192.0.2.7", // RFC 6066: no IP literals
            "2001:db8::7",
            "[2001:db8::7]",
            "",
            ".",
            "a..example",
            ".example",
            "-bad.example",
            "bad-.example",
            "sp ace.example",
            "nul\0.example",
            "caf\u{e9}.example",
            "example.123",
        ] {
            let hello = hello_with(&[server_name(name)]);
            assert!(is_malformed(&scan(&hello)), "{name:?}: {:?}", scan(&hello));
        }
        let long_label = format!("{}.example", "a".repeat(64));
        let long_name = format!("{}example", "abcdefghi.".repeat(25));
        for name in [long_label, long_name] {
            assert!(
                is_malformed(&scan(&hello_with(&[server_name(&name)]))),
                "{name}"
            );
        }
    }

    #[test]
    fn server_name_lists_that_do_not_add_up_are_malformed() {
        // An entry of an unknown name type.
        let unknown = server_name_entries(&[(1, b"x.example")]);
        // A host name then a byte of garbage inside the list.
        let mut garbage = server_name_entries(&[(0, b"x.example")]);
        garbage.push(0);
        let n = garbage.len() - 2;
        garbage[..2].copy_from_slice(&u16be(n));
        // The list is shorter than the extension.
        let mut short = server_name_entries(&[(0, b"x.example")]);
        short.extend_from_slice(&[1, 2, 3]);
        // The list claims more than the extension holds.
        let mut long = server_name_entries(&[(0, b"x.example")]);
        long[1] += 5;
        // An empty list, and an empty extension.
        let empty = vec![0, 0];
        let nothing = Vec::new();
        // A name that runs past the list.
        let mut overrun = server_name_entries(&[(0, b"x.example")]);
        overrun[4] += 1;
        for (label, body) in [
            ("unknown", unknown),
            ("garbage", garbage),
            ("short", short),
            ("long", long),
            ("empty", empty),
            ("nothing", nothing),
            ("overrun", overrun),
        ] {
            let hello = hello_with(&[(SERVER_NAME, body)]);
            assert!(is_malformed(&scan(&hello)), "{label}: {:?}", scan(&hello));
        }
    }

    #[test]
    fn trailing_garbage_in_or_after_the_extensions_is_malformed() {
        // Three bytes inside the extension block that are not an extension.
        let mut block = extension_block(&[server_name("x.example")]);
        block.extend_from_slice(&[0, 0, 7]);
        let n = block.len() - 2;
        block[..2].copy_from_slice(&u16be(n));
        assert!(is_malformed(&scan(&record(&hello_body(&block)))));
        // Bytes after the extension block, inside the ClientHello.
        let mut block = extension_block(&[server_name("x.example")]);
        block.push(0);
        assert!(is_malformed(&scan(&record(&hello_body(&block)))));
        // An extension that claims more than the block holds.
        let mut block = extension_block(&[server_name("x.example")]);
        block[5] += 1;
        assert!(is_malformed(&scan(&record(&hello_body(&block)))));
        // A duplicate extension other than server_name.
        let hello = hello_with(&[
            supported_versions(),
            server_name("x.example"),
            supported_versions(),
        ]);
        assert!(is_malformed(&scan(&hello)));
    }

    #[test]
    fn broken_fixed_fields_are_malformed() {
        let ext = extension_block(&[server_name("x.example")]);
        let good = hello_body(&ext);
        let mut long_session = good.clone();
        long_session[34] = 33;
        let mut odd_suites = good.clone();
        odd_suites[68] = 3;
        let mut no_suites = good.clone();
        no_suites[68] = 0;
        for (label, body) in [
            ("session id > 32", long_session),
            ("odd cipher suites", odd_suites),
            ("no cipher suites", no_suites),
            ("cut in the random", good[..20].to_vec()),
        ] {
            assert!(
                is_malformed(&scan(&record(&body))),
                "{label}: {:?}",
                scan(&record(&body))
            );
        }
    }

    #[test]
    fn hello_across_many_records() {
        let hello = client_hello("many.records.example", true);
        for size in [1, 3, 7, 100] {
            let cut = into_records_of(&hello, size);
            assert_eq!(
                scan(&cut),
                ClientHelloScan::Sni("many.records.example".into()),
                "records of {size} bytes"
            );
            // Every prefix short of the last byte needs more.
            for end in [cut.len() - 1, cut.len() / 2, 6] {
                assert_eq!(scan(&cut[..end]), ClientHelloScan::NeedMore, "{size}/{end}");
            }
        }
        // Two server_name extensions are found across records too.
        let hello = hello_with(&[server_name("a.example"), server_name("b.example")]);
        assert!(matches!(
            scan(&into_records_of(&hello, 10)),
            ClientHelloScan::Ambiguous(_)
        ));
    }

    #[test]
    fn records_that_cannot_carry_a_hello_are_malformed() {
        let hello = client_hello("records.example", true);
        let two = into_records_of(&hello, 64);
        // A change_cipher_spec record between two handshake records.
        let mut ccs = two[..5 + 64].to_vec();
        ccs.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
        ccs.extend_from_slice(&two[5 + 64..]);
        assert!(is_malformed(&scan(&ccs)), "{:?}", scan(&ccs));
        // An empty handshake record in the middle.
        let mut empty = two[..5 + 64].to_vec();
        empty.extend_from_slice(&[22, 3, 3, 0, 0]);
        empty.extend_from_slice(&two[5 + 64..]);
        assert!(is_malformed(&scan(&empty)), "{:?}", scan(&empty));
        // A second record with a version that is not 3.x.
        let mut version = two.clone();
        version[5 + 64 + 1] = 2;
        assert!(is_malformed(&scan(&version)), "{:?}", scan(&version));
    }

    #[test]
    fn a_hello_larger_than_the_bound_is_too_large() {
        // Padded to 20 KiB across two records: larger than the default bound.
        let hello = hello_with(&[server_name("big.example"), (21, vec![0; 20 * 1024])]);
        let cut = into_records_of(&hello, 16 * 1024);
        assert_eq!(scan(&cut), ClientHelloScan::TooLarge);
        assert_eq!(
            scan_client_hello(&cut, cut.len() + 1),
            ClientHelloScan::Sni("big.example".into())
        );
    }
}
