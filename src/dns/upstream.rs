//! Upstream nameserver addresses: `dns.nameservers` entries, or the host's resolv.conf.
//!
//! Entries are `IP`, `IP:PORT`, `[IPv6]:PORT`, `HOST` or `HOST:PORT` (port 53 when omitted).
//! Host names are resolved once, here, through the host's resolver; every address they resolve
//! to becomes an upstream, in the resolver's order. With no entries, the `nameserver` lines of
//! resolv.conf are used.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, ToSocketAddrs};
use std::path::Path;

/// The DNS port.
pub const DNS_PORT: u16 = 53;
/// Where the host's resolver configuration lives.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

const ACCEPTED: &str = "expected IP, IP:PORT, [IPv6]:PORT, HOST or HOST:PORT";

/// Resolves `dns.nameservers` entries; empty entries mean the host's /etc/resolv.conf.
pub fn resolve_upstreams(entries: &[String]) -> Result<Vec<SocketAddr>, String> {
    resolve_upstreams_with(entries, Path::new(RESOLV_CONF))
}

/// As [`resolve_upstreams`], reading `resolv_conf` when `entries` is empty.
pub fn resolve_upstreams_with(
    entries: &[String],
    resolv_conf: &Path,
) -> Result<Vec<SocketAddr>, String> {
    let mut out: Vec<SocketAddr> = Vec::new();
    if entries.is_empty() {
        let text = std::fs::read_to_string(resolv_conf).map_err(|e| {
            format!(
                "dns.nameservers is empty and {} can't be read ({e}); set dns.nameservers",
                resolv_conf.display()
            )
        })?;
        for addr in parse_resolv_conf(&text) {
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
        if out.is_empty() {
            return Err(format!(
                "dns.nameservers is empty and {} names no nameserver; set dns.nameservers",
                resolv_conf.display()
            ));
        }
        return Ok(out);
    }
    for entry in entries {
        for addr in parse_entry(entry)? {
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    Ok(out)
}

/// One `dns.nameservers` entry to its addresses.
pub fn parse_entry(entry: &str) -> Result<Vec<SocketAddr>, String> {
    let e = entry.trim();
    let err = |why: &str| format!("dns.nameservers: `{entry}`: {why}; {ACCEPTED}");
    if e.is_empty() {
        return Err(err("empty entry"));
    }
    if let Ok(ip) = e.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, DNS_PORT)]);
    }
    if let Ok(sa) = e.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(err("port 0"));
        }
        return Ok(vec![sa]);
    }
    if let Some(inner) = e.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| vec![SocketAddr::new(IpAddr::V6(ip), DNS_PORT)])
            .map_err(|_| err("not an IPv6 address in brackets"));
    }
    if e.starts_with('[') {
        return Err(err("bad [IPv6]:PORT form"));
    }
    // HOST or HOST:PORT
    let (host, port) = match e.rsplit_once(':') {
        Some((h, p)) => {
            if h.contains(':') {
                return Err(err("not an IP address, and a host name can't contain ':'"));
            }
            let port: u16 = p.parse().map_err(|_| err(&format!("invalid port `{p}`")))?;
            if port == 0 {
                return Err(err("port 0"));
            }
            (h, port)
        }
        None => (e, DNS_PORT),
    };
    if !valid_host_name(host) {
        return Err(err(&format!("`{host}` is not a valid host name")));
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| err(&format!("can't resolve `{host}` ({e})")))?
        .collect();
    if addrs.is_empty() {
        return Err(err(&format!("`{host}` resolved to no address")));
    }
    Ok(addrs)
}

fn valid_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .strip_suffix('.')
            .unwrap_or(host)
            .split('.')
            .all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
}

/// The `nameserver` addresses of a resolv.conf text (unparseable lines are skipped).
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(value) = words.next() else { continue };
        if let Some(addr) = parse_resolv_conf_address(value) {
            out.push(addr);
        }
    }
    out
}

fn parse_resolv_conf_address(value: &str) -> Option<SocketAddr> {
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, DNS_PORT));
    }
    // fe80::1%eth0 or fe80::1%2: a scoped IPv6 address.
    let (ip, zone) = value.split_once('%')?;
    let ip: Ipv6Addr = ip.parse().ok()?;
    let scope = match zone.parse::<u32>() {
        Ok(n) => n,
        Err(_) => {
            let cname = std::ffi::CString::new(zone).ok()?;
            // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
            let idx = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            if idx == 0 {
                return None;
            }
            idx
        }
    };
    Some(SocketAddr::V6(SocketAddrV6::new(ip, DNS_PORT, 0, scope)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ip_forms() {
        assert_eq!(parse_entry("1.1.1.1").unwrap(), vec![sa("1.1.1.1:53")]);
        assert_eq!(
            parse_entry("127.0.0.1:5353").unwrap(),
            vec![sa("127.0.0.1:5353")]
        );
        assert_eq!(
            parse_entry("2001:db8::1").unwrap(),
            vec![sa("[2001:db8::1]:53")]
        );
        assert_eq!(parse_entry("::1").unwrap(), vec![sa("[::1]:53")]);
        assert_eq!(parse_entry("[::1]:5300").unwrap(), vec![sa("[::1]:5300")]);
        assert_eq!(
            parse_entry("[2001:db8::2]").unwrap(),
            vec![sa("[2001:db8::2]:53")]
        );
        assert_eq!(parse_entry(" 9.9.9.9 ").unwrap(), vec![sa("9.9.9.9:53")]);
    }

    #[test]
    fn host_forms_use_the_host_resolver() {
        // `localhost` is answered from the hosts file, without any network.
        let addrs = parse_entry("localhost:5353").unwrap();
        assert!(!addrs.is_empty());
        assert!(addrs
            .iter()
            .all(|a| a.port() == 5353 && a.ip().is_loopback()));
        let addrs = parse_entry("localhost").unwrap();
        assert!(addrs.iter().all(|a| a.port() == 53));
    }

    #[test]
    fn errors_name_the_field_and_value() {
        for bad in [
            "",
            "1.1.1.1:0",
            "1.1.1.1:99999",
            "host:port",
            "[::1",
            "[zz]",
            "a:b:c",
            "bad host",
            "-.invalid..",
        ] {
            let e = parse_entry(bad).unwrap_err();
            assert!(e.starts_with("dns.nameservers: `"), "{e}");
            assert!(e.contains(ACCEPTED), "{e}");
        }
    }

    #[test]
    fn entries_are_deduplicated_in_order() {
        let got = resolve_upstreams_with(
            &[
                "10.0.0.2".into(),
                "10.0.0.1:53".into(),
                "10.0.0.2:53".into(),
            ],
            Path::new("/nonexistent"),
        )
        .unwrap();
        assert_eq!(got, vec![sa("10.0.0.2:53"), sa("10.0.0.1:53")]);
    }

    #[test]
    fn resolv_conf_is_used_when_empty() {
        let dir = std::env::temp_dir().join(format!("netfence-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        std::fs::write(
            &path,
            "# comment\nsearch example.internal\nnameserver 192.0.2.53 # trailing\n\
             nameserver   2001:db8::53\n;nameserver 192.0.2.99\nnameserver bogus\n\
             options ndots:2\nnameserver 192.0.2.53\nnameserver fe80::1%1\n",
        )
        .unwrap();
        let got = resolve_upstreams_with(&[], &path).unwrap();
        assert_eq!(got[..2], [sa("192.0.2.53:53"), sa("[2001:db8::53]:53")]);
        assert_eq!(got.len(), 3);
        match got[2] {
            SocketAddr::V6(v6) => assert_eq!(v6.scope_id(), 1),
            other => panic!("expected scoped v6, got {other}"),
        }

        std::fs::write(&path, "search x\n").unwrap();
        let e = resolve_upstreams_with(&[], &path).unwrap_err();
        assert!(e.contains("names no nameserver"), "{e}");
        let e = resolve_upstreams_with(&[], &dir.join("missing")).unwrap_err();
        assert!(e.contains("can't be read"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
