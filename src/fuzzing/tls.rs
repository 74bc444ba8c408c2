//! Fuzz body for the ClientHello scanner ([`scan_client_hello`]).

use std::net::Ipv4Addr;

use super::Input;
use crate::tls::sni::{scan_client_hello, ClientHelloScan, DEFAULT_MAX_CLIENT_HELLO};

/// Whether `name` is what `Sni` may carry: a lower-case host name without a trailing dot,
/// 1-253 bytes of letters, digits, `-`, `_` and dots, labels of 1-63 bytes that neither start
/// nor end with `-`, the last one not all digits, and not an IPv4 address.
fn is_clean_host_name(name: &str) -> bool {
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b);
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(allowed)
        && name.parse::<Ipv4Addr>().is_err()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
        && name
            .rsplit('.')
            .next()
            .is_some_and(|last| !last.bytes().all(|b| b.is_ascii_digit()))
}

/// Input: two bytes choosing where the buffer is cut and the scan bound, then the bytes a
/// client sent first.
///
/// Holds: no panic; `Sni(name)` is a clean lower-case host name; the scan is stable as bytes
/// arrive: when the first part of the buffer already gives a verdict other than `NeedMore`,
/// the whole buffer gives the same one (the gate decides on the first verdict, so a hello
/// sent in pieces is judged like one sent whole).
pub fn sni(data: &[u8]) {
    let mut input = Input::new(data);
    let cut = usize::from(input.byte());
    let bound = input.byte();
    let buf = input.rest();
    let max_bytes = match bound {
        0..=127 => DEFAULT_MAX_CLIENT_HELLO,
        b => usize::from(b) * 8,
    };
    let whole = scan_client_hello(buf, max_bytes);
    if let ClientHelloScan::Sni(name) = &whole {
        assert!(is_clean_host_name(name), "SNI {name:?}");
    }
    let cut = (cut * buf.len()) / 255;
    let first = scan_client_hello(&buf[..cut], max_bytes);
    if first != ClientHelloScan::NeedMore {
        assert_eq!(
            first,
            whole,
            "the first {cut} bytes gave another verdict than all {}",
            buf.len()
        );
    }
}

/// A handshake record around `body`.
fn record(body: &[u8]) -> Vec<u8> {
    let mut r = vec![22, 3, 1];
    r.extend_from_slice(&(body.len() as u16).to_be_bytes());
    r.extend_from_slice(body);
    r
}

/// A ClientHello handshake message with these extensions.
fn hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]);
    body.extend_from_slice(&[1, 0]);
    let mut block = Vec::new();
    for (kind, data) in extensions {
        block.extend_from_slice(&kind.to_be_bytes());
        block.extend_from_slice(&(data.len() as u16).to_be_bytes());
        block.extend_from_slice(data);
    }
    body.extend_from_slice(&(block.len() as u16).to_be_bytes());
    body.extend_from_slice(&block);
    let mut message = vec![1];
    message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend_from_slice(&body);
    message
}

fn server_name(names: &[&[u8]]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for name in names {
        list.push(0);
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name);
    }
    let mut data = (list.len() as u16).to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    (0, data)
}

fn seed(cut: u8, bytes: &[u8]) -> Vec<u8> {
    let mut s = vec![cut, 0];
    s.extend_from_slice(bytes);
    s
}

pub fn sni_seeds() -> Vec<Vec<u8>> {
    let versions = (43u16, vec![2, 3, 4]);
    let one = hello(&[server_name(&[b"www.Example.com"]), versions.clone()]);
    let whole = record(&one);
    let (a, b) = one.split_at(40);
    let mut split = record(a);
    split.extend_from_slice(&record(b));
    vec![
        seed(128, &whole),
        seed(255, &split),
        seed(200, &record(&hello(std::slice::from_ref(&versions)))),
        seed(
            100,
            &record(&hello(&[server_name(&[b"a.example", b"b.example"])])),
        ),
        seed(
            60,
            &record(&hello(&[
                server_name(&[b"a.example"]),
                server_name(&[b"b.example"]),
            ])),
        ),
        seed(30, &record(&hello(&[server_name(&[b"192.0.2.1"])]))),
        seed(10, b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"),
    ]
}
