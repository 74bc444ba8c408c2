//! The server name of a TLS ClientHello.
//!
//! The datapath completes the guest's TCP handshake, buffers what the guest sends first, and
//! calls [`scan_client_hello`] with everything buffered so far after every read, until the
//! answer is not [`ClientHelloScan::NeedMore`]. The bytes are then replayed upstream unchanged.
//!
//! The ClientHello is parsed by rustls' server-side [`Acceptor`], which handles records split
//! across reads and handshake messages split across records. A cheap look at the first bytes
//! (record type handshake, version 3.x, handshake type client_hello) first tells TLS from other
//! protocols, so that plain HTTP on port 443 is reported as [`ClientHelloScan::NotTls`] at once.
//! The scan is bounded: at most `max_bytes` are looked at.

use rustls::server::Acceptor;

use crate::dns::normalize_name;

/// A default bound for the bytes read while looking for a ClientHello (large post-quantum
/// key shares make a ClientHello about 2 KiB; a few records' worth is plenty).
pub const DEFAULT_MAX_CLIENT_HELLO: usize = 16 * 1024;

/// TLS record content type of handshake messages.
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Largest TLS plaintext record fragment.
const MAX_FRAGMENT: usize = 16384;

/// What the first bytes of a connection say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientHelloScan {
    /// A ClientHello has begun but is not complete: read more and scan again.
    NeedMore,
    /// A complete ClientHello naming this server (lower case, no trailing dot).
    Sni(String),
    /// A complete ClientHello without a server name (or naming an IP address).
    NoSni,
    /// The bytes are not a TLS handshake: another protocol.
    NotTls,
    /// They begin like a ClientHello but are not a valid one.
    Malformed,
    /// No complete ClientHello within `max_bytes`.
    TooLarge,
}

/// Scans the first bytes a client sent (all of them so far) for a ClientHello and its SNI.
pub fn scan_client_hello(buf: &[u8], max_bytes: usize) -> ClientHelloScan {
    if let Some(verdict) = precheck(buf) {
        return verdict;
    }
    let window = &buf[..buf.len().min(max_bytes)];
    let mut acceptor = Acceptor::default();
    let mut rest = window;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return ClientHelloScan::Malformed,
        }
        // Let rustls look at what it has, so its buffer never has to hold more than a record.
        match acceptor.accept() {
            Ok(None) => {}
            Ok(Some(accepted)) => {
                return match accepted.client_hello().server_name() {
                    Some(name) => ClientHelloScan::Sni(normalize_name(name)),
                    None => ClientHelloScan::NoSni,
                }
            }
            Err(_) => return ClientHelloScan::Malformed,
        }
    }
    if buf.len() >= max_bytes {
        ClientHelloScan::TooLarge
    } else {
        ClientHelloScan::NeedMore
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
    fn no_sni_when_disabled_or_ip() {
        let hello = client_hello("api.example.com", false);
        assert_eq!(
            scan_client_hello(&hello, DEFAULT_MAX_CLIENT_HELLO),
            ClientHelloScan::NoSni
        );
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
        assert_eq!(
            scan_client_hello(&data, DEFAULT_MAX_CLIENT_HELLO),
            ClientHelloScan::Malformed
        );
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
}
