//! Tests of the config model: parsing, validation messages, command-line grammar and merge.

use std::net::IpAddr;

use super::*;

#[test]
fn smoke_toml_and_map() {
    let cfg = parse_str(
        r#"
policy = "public_only"
map = ["203.0.113.7:80=127.0.0.1:8080", "[2001:db8::1]:443=[::1]:8443"]
[[rules]]
action = "allow"
destination = "host"
protocol = "tcp"
port = 8080
"#,
        Format::Toml,
    )
    .unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.policy, Some(PolicySpec::Preset(Preset::PublicOnly)));
    let m = &cfg.map[0];
    assert_eq!(
        m.map("203.0.113.7:80".parse().unwrap()),
        Some("127.0.0.1:8080".parse().unwrap())
    );
    assert_eq!(m.map("203.0.113.7:81".parse().unwrap()), None);
    let e = parse_str("polcy = \"none\"", Format::Toml).unwrap_err();
    assert!(e.to_string().contains("unknown field `polcy`"), "{e}");
}

/// (config text, field path, substring of the message) for files that must be rejected.
const TOML_ERRORS: &[(&str, &str, &str)] = &[
    (
        "[[rules]]\naction = \"allow\"\ndirection = \"ingress\"\nprotocol = \"icmpv4\"",
        "rules[0].protocol",
        "ICMP is not allowed in a rule with direction `ingress`",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndirection = \"any\"\nprotocols = [\"tcp\", \"icmpv6\"]",
        "rules[0].protocols[1]",
        "no inbound ICMP path",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndestination = \"publc\"",
        "rules[0].destination",
        "unknown group `publc`; groups are: host, metadata",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndestination = { kind = \"group\", value = \"lan\" }",
        "rules[0].destination",
        "unknown group `lan`",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndestination = \"10.0.0.1/8\"",
        "rules[0].destination",
        "`10.0.0.1/8` has host bits set; did you mean 10.0.0.0/8?",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndestination = \"fd00::1/8\"",
        "rules[0].destination",
        "did you mean fd00::/8?",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndestination = \"10.0.0.0/33\"",
        "rules[0].destination",
        "bad prefix length `33`; expected 0-32",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndestination = \"2001:db8::/129\"",
        "rules[0].destination",
        "bad prefix length `129`; expected 0-128",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndestination = \"300.1.2.3/8\"",
        "rules[0].destination",
        "`300.1.2.3` is not an IP address",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndestination = { kind = \"cidr\", value = \"10.0.0.0/40\" }",
        "rules[0].destination",
        "bad prefix length `40`",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndestination = { kind = \"ip\", value = \"10.0.0\" }",
        "rules[0].destination",
        "`10.0.0` is not an IP address (kind `ip`)",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndestination = { kind = \"host\", value = \"x\" }",
        "rules[0].destination",
        "unknown destination kind `host`; expected any, ip, cidr, domain, domain_suffix or group",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndestination = { kind = \"domain\" }",
        "rules[0].destination",
        "needs a `value`",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndestination = \"exa_mple..com\"",
        "rules[0].destination",
        "has an empty label",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndestination = \"-bad.example.com\"",
        "rules[0].destination",
        "starts or ends with `-`",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndestination = \"bad!.example.com\"",
        "rules[0].destination",
        "may hold only letters, digits",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndestination = \".\"",
        "rules[0].destination",
        "empty domain name",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndestination = \"1.2.3.999\"",
        "rules[0].destination",
        "looks like an IP address",
    ),
    (
        "[[rules]]\naction = \"allow\"\nport = \"9000-8000\"",
        "rules[0].port",
        "port range `9000-8000` is reversed; write 8000-9000",
    ),
    (
        "[[rules]]\naction = \"allow\"\nports = [0]",
        "rules[0].ports[0]",
        "port `0` is out of range; expected 1-65535",
    ),
    (
        "[[rules]]\naction = \"allow\"\nports = [\"443\", 70000]",
        "rules[0].ports[1]",
        "port `70000` is out of range; expected 1-65535",
    ),
    (
        "[[rules]]\naction = \"allow\"\nport = \"80-70000\"",
        "rules[0].port",
        "out of range",
    ),
    (
        "[[rules]]\naction = \"allow\"\nport = \"http\"",
        "rules[0].port",
        "`http` is not a port",
    ),
    (
        "[[rules]]\nacton = \"allow\"",
        "rules[0].acton",
        "unknown field `acton`, expected one of `action`",
    ),
    (
        "[[rules]]\ndestination = \"public\"",
        "rules[0]",
        "missing field `action`",
    ),
    (
        "[[rules]]\naction = \"permit\"",
        "rules[0].action",
        "unknown variant `permit`, expected `allow` or `deny`",
    ),
    (
        "[[rules]]\naction = \"allow\"\ndirection = \"sideways\"",
        "rules[0].direction",
        "unknown variant `sideways`",
    ),
    (
        "[[rules]]\naction = \"allow\"\nprotocols = [\"tcp\", \"sctp\"]",
        "rules[0].protocols[1]",
        "unknown variant `sctp`, expected one of `tcp`, `udp`, `icmpv4`, `icmpv6`",
    ),
    (
        "policy = \"public\"",
        "policy",
        "unknown policy preset `public`; expected none, public-only, allow-all or non-local",
    ),
    (
        "[policy]\ndefault_egress = \"maybe\"",
        "policy.default_egress",
        "unknown variant `maybe`",
    ),
    (
        "[policy]\nrules = [{ action = \"allow\", destination = \"10.0.0.1/8\" }]",
        "policy.rules[0].destination",
        "host bits set",
    ),
    (
        "[policy]\nrules = [{ action = \"allow\", direction = \"ingress\", protocols = [\"icmpv4\"] }]",
        "policy.rules[0].protocols[0]",
        "ICMP is not allowed",
    ),
    ("[policy]\ndefault = \"deny\"", "policy.default", "unknown field `default`"),
    ("polcy = \"none\"", "polcy", "unknown field `polcy`, expected one of `policy`"),
    (
        "ports = [\"8080\"]",
        "ports[0]",
        "expected [BIND:]HOST_PORT:GUEST_PORT[/udp]",
    ),
    (
        "ports = [\"8080:80/sctp\"]",
        "ports[0]",
        "unknown protocol `sctp` (tcp or udp)",
    ),
    (
        "ports = [{ host_port = 8080, guest_port = 0 }]",
        "ports[0]",
        "guest_port 0 is not allowed; expected 1-65535",
    ),
    (
        "ports = [{ host_port = 8080, guest_port = 80, proto = \"tcp\" }]",
        "ports[0].proto",
        "unknown field `proto`",
    ),
    (
        "ports = [\"8080:80\", \"8080:81\"]",
        "ports[1]",
        "host port 8080/tcp is already published by ports[0]",
    ),
    (
        "ports = [\"0.0.0.0:8080:80\", \"127.0.0.1:8080:81\"]",
        "ports[1]",
        "already published",
    ),
    ("map = [\"1.2.3.4\"]", "map[0]", "has no `=`"),
    ("map = [\"1.2.3.4=\"]", "map[0]", "host side `` is not an IP address"),
    ("map = [\"1.2.3.4:0=127.0.0.1\"]", "map[0]", "not a number 1-65535"),
    ("map = [\"0.0.0.0=127.0.0.1\"]", "map[0]", "is unspecified"),
    (
        "map = [\"1.2.3.4=127.0.0.1:80\", \"1.2.3.4=127.0.0.1:81\"]",
        "map[1]",
        "already mapped by map[0]",
    ),
    (
        "ipv4_pool = \"10.0.0.1/8\"",
        "ipv4_pool",
        "host bits set; did you mean 10.0.0.0/8?",
    ),
    ("ipv4_pool = \"10.0.0.0/31\"", "ipv4_pool", "at least one /30"),
    ("ipv4_pool = \"banana\"", "ipv4_pool", "not an IPv4 CIDR"),
    ("ipv6_pool = \"10.0.0.0/8\"", "ipv6_pool", "not an IPv6 CIDR"),
    ("ipv6_pool = \"fd00::/72\"", "ipv6_pool", "at least one /64"),
    ("max_connections = 0", "max_connections", "must be at least 1"),
    ("max_connections = -1", "max_connections", "invalid value"),
    (
        "deny_domains = [\"bad..example\"]",
        "deny_domains[0]",
        "has an empty label",
    ),
    (
        "deny_domain_suffixes = [\".\"]",
        "deny_domain_suffixes[0]",
        "expected a suffix like .ads.example",
    ),
    (
        "[dns]\nnameservers = [\"1.1.1.1:99999\"]",
        "dns.nameservers[0]",
        "port `99999` is not 1-65535",
    ),
    (
        "[dns]\nnameservers = [\"[2001:db8::1]:x\"]",
        "dns.nameservers[0]",
        "expected IP, IP:PORT, HOST or HOST:PORT",
    ),
    ("[dns]\nnamservers = []", "dns.namservers", "unknown field `namservers`"),
    ("[dns]\nquery_timeout_ms = 0", "dns.query_timeout_ms", "at least 1"),
    ("[dns]\nhost_aliases = [\"a..b\"]", "dns.host_aliases[0]", "empty label"),
    ("[tls]\nca_cert = \"/x.pem\"", "tls.ca_key", "tls.ca_cert is set"),
    ("[tls]\nintercepted_ports = [0]", "tls.intercepted_ports[0]", "port 0"),
    ("[tls]\nbypass = [\"*.\"]", "tls.bypass[0]", "expected a domain or *.suffix"),
    ("[tls]\nmitm = true", "tls.mitm", "unknown field `mitm`"),
    ("[tls]\nallow_no_sni = 1", "tls.allow_no_sni", "invalid type"),
    ("[tls]\nca_cn = \" \"", "tls.ca_cn", "must not be empty"),
    (
        "[tls]\nca_cn = \"0123456789012345678901234567890123456789012345678901234567890123456789\"",
        "tls.ca_cn",
        "longer than 64 characters",
    ),
    (
        "[tls]\nca_cert = \"/c.pem\"\nca_key = \"/k.pem\"\nca_cn = \"x\"",
        "tls.ca_cn",
        "names a generated CA",
    ),
    (
        "on_secret_violation = \"explode\"",
        "on_secret_violation",
        "expected block, block_and_log or block_and_terminate",
    ),
    (
        "[[secrets]]\nenv_var = \"A=B\"\nvalue = \"v\"",
        "secrets[0].env_var",
        "expected an environment variable name",
    ),
    (
        "[[secrets]]\nenv_var = \"1A\"\nvalue = \"v\"",
        "secrets[0].env_var",
        "a letter or `_`, then letters, digits or `_`",
    ),
    (
        "[[secrets]]\nenv_var = \"A\"\nvalue = \"v\"\nallowed_hosts = [\"a.example\"]\n[[secrets]]\nenv_var = \"A\"\nvalue = \"w\"\nallowed_hosts = [\"a.example\"]",
        "secrets[1].env_var",
        "secrets[0] already uses this name",
    ),
    (
        "[[secrets]]\nenv_var = \"A\"\nallowed_hosts = [\"a.example\"]",
        "secrets[0]",
        "no value is given; set exactly one of value, value_env",
    ),
    (
        "[[secrets]]\nenv_var = \"A\"\nvalue = \"v\"\nvalue_env = \"B\"\nallowed_hosts = [\"a.example\"]",
        "secrets[0]",
        "value and value_env are set; set exactly one",
    ),
    (
        "[[secrets]]\nenv_var = \"A\"\nvalue_env = \"B\"\nvalue_file = \"/k\"\nallowed_hosts = [\"a.example\"]",
        "secrets[0]",
        "value_env and value_file are set",
    ),
    (
        "[[secrets]]\nenv_var = \"A\"\nvalue = \"line\\nbreak\"\nallowed_hosts = [\"a.example\"]",
        "secrets[0].value",
        "holds a control character (byte 5 of the value is 0x0a)",
    ),
    (
        "[[secrets]]\nenv_var = \"A\"\nvalue = 12345\nallowed_hosts = [\"a.example\"]",
        "secrets[0].value",
        "expected a string (the value given is not shown)",
    ),
    (
        "[[secrets]]\nenv_var = \"A\"\nvalue_env = \"NOT-A-NAME\"\nallowed_hosts = [\"a.example\"]",
        "secrets[0].value_env",
        "expected the name of an environment variable",
    ),
    (
        "[[secrets]]\nenv_var = \"A\"\nvalue_file = \"\"\nallowed_hosts = [\"a.example\"]",
        "secrets[0].value_file",
        "expected the path of a file",
    ),
    (
        "[[secrets]]\nenv_var = \"A\"\nvalue = \"v\"\nplaceholder = \"P\"\nallowed_hosts = [\"a.example\"]",
        "secrets[0].placeholder",
        "is 1 bytes; a placeholder must be 16-256 bytes",
    ),
    (
        "[[secrets]]\nenv_var = \"A\"\nvalue = \"v\"\nplaceholder = \"has space in it 0123\"\nallowed_hosts = [\"a.example\"]",
        "secrets[0].placeholder",
        "may hold only letters, digits, `-`, `.`, `_` and `~`",
    ),
    (
        "[[secrets]]\nenv_var = \"A\"\nvalue = \"v\"\nplaceholder = \"PLACEHOLDER-0123456789\"\nallowed_hosts = [\"a.example\"]\n\
         [[secrets]]\nenv_var = \"B\"\nvalue = \"w\"\nplaceholder = \"PLACEHOLDER-0123456789-2\"\nallowed_hosts = [\"a.example\"]",
        "secrets[1].placeholder",
        "overlaps the placeholder of secrets[0] (`PLACEHOLDER-0123456789`)",
    ),
    (
        "[[secrets]]\nenv_var = \"A\"\nvalue = \"v\"",
        "secrets[0].allowed_hosts",
        "is empty; a secret is substituted only for these hosts",
    ),
    (
        "[[secrets]]\nenv_var = \"A\"\nvalue = \"v\"\nallowed_hosts = [\"a.example\"]\nsubstitute_in = []",
        "secrets[0].substitute_in",
        "names no part; expected a non-empty subset",
    ),
    (
        "[[secrets]]\nenv_var = \"A\"\nvalue = \"v\"\nallowed_hosts = [\"a.example\"]\nsubstitute_in = [\"cookies\"]",
        "secrets[0].substitute_in[0]",
        "unknown request part `cookies`; expected headers, query or body",
    ),
    (
        "[[secrets]]\nenv_var = \"A\"\nvalue = \"v\"\nallowed_hosts = [\"a.example\"]\nvalue_flie = \"/k\"",
        "secrets[0].value_flie",
        "unknown field `value_flie`",
    ),
    ("[[secrets]]\nenv_var = \"A\"\nvalue = \"\"", "secrets[0].value", "must not be empty"),
    (
        "[[secrets]]\nenv_var = \"A\"\nvalue = \"v\"\nallowed_hosts = [\"x\"]",
        "secrets[0].allowed_hosts[0]",
        "single label",
    ),
    ("deny_action = \"explode\"", "deny_action", "expected `drop` or `reject`"),
    ("trust_host_cas = \"yes\"", "trust_host_cas", "invalid type"),
];

fn parse_and_validate(text: &str, f: Format) -> Result<NetworkConfig, ConfigError> {
    let cfg = parse_str(text, f)?;
    cfg.validate()?;
    Ok(cfg)
}

#[test]
fn toml_errors_name_field_value_and_accepted() {
    for (text, field, msg) in TOML_ERRORS {
        let e = parse_and_validate(text, Format::Toml).expect_err(&format!("accepted {text:?}"));
        assert_eq!(e.field, *field, "field for {text:?}: {e}");
        let shown = e.to_string();
        assert!(shown.contains(msg), "message for {text:?}: {shown}");
        assert!(shown.starts_with(field), "{shown}");
        assert_eq!(e.exit_code(), 2);
    }
}

#[test]
fn json_errors() {
    let cases: &[(&str, &str, &str)] = &[
        (
            r#"{"rules":[{"action":"allow","destination":"publc"}]}"#,
            "rules[0].destination",
            "unknown group `publc`",
        ),
        (
            r#"{"policy": {"rules": [{"action":"allow","port":"1-2-3"}]}}"#,
            "policy.rules[0].port",
            "is not a port",
        ),
        (r#"{"x":1}"#, "x", "unknown field `x`"),
        ("{", "", "EOF while parsing"),
        (r#"{} {}"#, "", "trailing characters"),
        (
            r#"{"rules":[{"action":"allow","direction":"ingress","protocol":"icmpv6"}]}"#,
            "rules[0].protocol",
            "ICMP is not allowed",
        ),
    ];
    for (text, field, msg) in cases {
        let e = parse_and_validate(text, Format::Json).expect_err(text);
        assert_eq!(e.field, *field, "{text}: {e}");
        assert!(e.to_string().contains(msg), "{text}: {e}");
        assert_eq!(e.exit_code(), 2);
    }
}

const FULL_TOML: &str = r#"
deny_domains = ["evil.example"]
deny_domain_suffixes = [".ads.example"]
dns_rebind_protection = false
ipv4_pool = "10.128.0.0/16"
ipv6_pool = "fd00:1::/48"
max_connections = 64
on_secret_violation = "block-and-terminate"
trust_host_cas = true
map = ["203.0.113.7:80=127.0.0.1:8080", "[2001:db8::1]:443=[::1]:8443", "198.51.100.9=::1"]
deny_action = "reject"
ports = ["8080:80", "0.0.0.0:5353:53/udp", { host_port = 9000, guest_port = 90, bind = "::1", protocol = "udp" }]

[policy]
default_egress = "deny"
default_ingress = "deny"

[[policy.rules]]
action = "allow"
destination = { kind = "group", value = "public" }
protocol = "tcp"
port = 443

[[policy.rules]]
action = "allow"
direction = "any"
destination = { kind = "cidr", value = "10.0.0.0/8" }
protocols = ["tcp", "udp"]
ports = ["8000-9000", 53]

[[rules]]
action = "deny"
destination = ".example.com"

[[rules]]
action = "allow"
destination = { kind = "domain_suffix", value = ".example.org" }

[[rules]]
action = "allow"
destination = { kind = "ip", value = "::ffff:192.0.2.1" }
protocol = "icmpv4"

[[rules]]
action = "allow"
destination = "*"
direction = "ingress"

[dns]
nameservers = ["1.1.1.1", "9.9.9.9:53", "[2001:db8::53]:5353", "resolver.example", "dns:53"]
query_timeout_ms = 1500
rebind_protection = true
intercept_all = false

[tls]
bypass = ["*.pinned.example", "bank.example"]
verify_upstream = false
intercepted_ports = [443, 8443]
block_quic = true
ca_cert = "/etc/netfence/ca.pem"
ca_key = "/etc/netfence/ca.key"

[[secrets]]
env_var = "API_KEY"
value = "s3cret"
allowed_hosts = ["api.example.com", "*.example.net"]
on_violation = "block"
"#;

#[test]
fn full_toml_parses() {
    let cfg = parse_and_validate(FULL_TOML, Format::Toml).unwrap();
    let eff = cfg.effective_policy();
    assert_eq!(eff.preset, None);
    assert_eq!(eff.default_egress, Action::Deny);
    assert_eq!(eff.default_ingress, Action::Deny);
    assert_eq!(eff.rules.len(), 6);
    assert_eq!(eff.rules[0].to_string(), "allow@public:tcp:443");
    assert_eq!(
        eff.rules[1].to_string(),
        "allow:any@10.0.0.0/8:tcp+udp:8000-9000+53"
    );
    assert_eq!(eff.rules[2].to_string(), "deny@.example.com");
    assert_eq!(eff.rules[3].to_string(), "allow@.example.org");
    assert_eq!(eff.rules[4].to_string(), "allow@192.0.2.1:icmpv4");
    assert_eq!(eff.rules[5].to_string(), "allow:ingress@*");
    assert_eq!(cfg.ports.len(), 3);
    assert_eq!(cfg.ports[1].protocol, PortProtocol::Udp);
    assert_eq!(cfg.ports[1].bind, "0.0.0.0".parse::<IpAddr>().unwrap());
    assert_eq!(cfg.ports[2].to_string(), "[::1]:9000:90/udp");
    assert_eq!(cfg.ports[0].to_string(), "127.0.0.1:8080:80");
    assert_eq!(cfg.deny_action, DenyAction::Reject);
    assert_eq!(
        cfg.on_secret_violation,
        Some(ViolationAction::BlockAndTerminate)
    );
    assert_eq!(cfg.max_connections, Some(64));
    assert!(cfg.rebind_protection(), "the nested dns value wins");
    assert!(cfg.tls.is_enabled());
    assert_eq!(cfg.dns.query_timeout_ms, Some(1500));
    assert_eq!(cfg.map.len(), 3);
    assert!(!format!("{:?}", cfg.secrets[0]).contains("s3cret"));
    let gw = cfg.gateway_addrs(2);
    assert_eq!(
        gw.ipv4,
        vec!["10.128.0.9".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    assert_eq!(
        gw.ipv6,
        vec![
            "fd00:1:0:2::1".parse::<std::net::Ipv6Addr>().unwrap(),
            "fe80::1".parse().unwrap()
        ]
    );
}

#[test]
fn full_toml_round_trips() {
    let mut cfg = parse_and_validate(FULL_TOML, Format::Toml).unwrap();
    let text = to_toml(&cfg);
    // Everything round-trips but an inline secret value, which is never written out.
    assert!(
        !text.contains("s3cret") && text.contains("value = \"<redacted>\""),
        "{text}"
    );
    cfg.secrets[0].value = Some(SecretValue::new(REDACTED));
    let again = parse_and_validate(&text, Format::Toml).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(again, cfg, "{text}");
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(
        parse_and_validate(&json, Format::Json).unwrap(),
        cfg,
        "{json}"
    );
}

#[test]
fn ports_mapping_form() {
    let c = parse_and_validate("[ports]\n8080 = 80\n9090 = 90", Format::Toml).unwrap();
    let shown: Vec<String> = c.ports.iter().map(|p| p.to_string()).collect();
    assert_eq!(shown, ["127.0.0.1:8080:80", "127.0.0.1:9090:90"]);
    let c = parse_and_validate(r#"{"ports": {"8080": 80}}"#, Format::Json).unwrap();
    assert_eq!(c.ports.len(), 1);
    let e = parse_and_validate("[ports]\nhttp = 80", Format::Toml).unwrap_err();
    assert!(
        e.to_string().contains("host port `http` is not a port"),
        "{e}"
    );
    let e = parse_and_validate("[ports]\n8080 = 0", Format::Toml).unwrap_err();
    assert!(e.to_string().contains("guest_port 0"), "{e}");
}

#[test]
fn allow_no_sni_parses_and_is_named_inert_while_interception_is_off() {
    let c =
        parse_and_validate("[tls]\nenabled = false\nallow_no_sni = true", Format::Toml).unwrap();
    assert_eq!(c.tls.allow_no_sni, Some(true));
    assert_eq!(c.tls.interception_only_keys(), ["allow_no_sni"]);
    assert!(to_toml(&c).contains("allow_no_sni = true"));
    let c = parse_and_validate("[tls]\nintercepted_ports = [8443]", Format::Toml).unwrap();
    assert!(c.tls.interception_only_keys().is_empty());
}

#[test]
fn legacy_rebind_and_tls_presence() {
    let c = parse_and_validate("dns_rebind_protection = false", Format::Toml).unwrap();
    assert!(!c.rebind_protection());
    assert!(!c.tls.is_enabled());
    assert!(NetworkConfig::default().rebind_protection());
    let c = parse_and_validate("[tls]", Format::Toml).unwrap();
    assert!(c.tls.is_enabled());
    let c = parse_and_validate("[tls]\nenabled = false", Format::Toml).unwrap();
    assert!(!c.tls.is_enabled());
}

#[test]
fn json_equals_toml() {
    let json = r#"{
        "policy": {"default_egress": "deny", "rules": [
            {"action": "allow", "destination": "public", "protocol": "tcp", "port": "443"},
            {"action": "allow", "destination": "host", "protocol": "udp", "port": 53}
        ]},
        "map": ["203.0.113.7=127.0.0.1"],
        "ports": [{"host_port": 8080, "guest_port": 80}]
    }"#;
    let toml = r#"
map = ["203.0.113.7=127.0.0.1"]
ports = ["8080:80"]
[policy]
default_egress = "deny"
rules = [
  { action = "allow", destination = "public", protocol = "tcp", port = "443" },
  { action = "allow", destination = "host", protocol = "udp", port = 53 },
]
"#;
    assert_eq!(
        parse_and_validate(json, Format::Json).unwrap(),
        parse_and_validate(toml, Format::Toml).unwrap()
    );
}

#[test]
fn preset_spellings() {
    for (s, p) in [
        ("none", Preset::None),
        ("public-only", Preset::PublicOnly),
        ("public_only", Preset::PublicOnly),
        ("allow-all", Preset::AllowAll),
        ("allow_all", Preset::AllowAll),
        ("non-local", Preset::NonLocal),
        ("non_local", Preset::NonLocal),
        ("Public-Only", Preset::PublicOnly),
    ] {
        let c = parse_and_validate(&format!("policy = {s:?}"), Format::Toml).unwrap();
        assert_eq!(c.policy, Some(PolicySpec::Preset(p)), "{s}");
        assert_eq!(s.parse::<Preset>(), Ok(p));
    }
}

#[test]
fn destinations_parse() {
    let cases: &[(&str, &str)] = &[
        ("*", "*"),
        ("any", "*"),
        ("ANY", "*"),
        ("public", "public"),
        ("link_local", "link-local"),
        ("10.0.0.1", "10.0.0.1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("[fc00::/7]", "fc00::/7"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("[::ffff:192.0.2.1/128]", "192.0.2.1/32"),
        ("Api.Example.COM.", "api.example.com"),
        (".example.com", ".example.com"),
        ("*.example.com", ".example.com"),
        ("_srv.example.com", "_srv.example.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ];
    for (input, shown) in cases {
        let d: Destination = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(d.to_string(), *shown, "{input}");
        assert_eq!(shown.parse::<Destination>(), Ok(d), "{shown} round trip");
    }
    let long_label = format!("{}.example", "a".repeat(64));
    let long_name = format!("{}example", "abcdefghi.".repeat(26));
    for bad in [
        "",
        "publc",
        "localhost",
        "10.0.0.1/8",
        "10.0.0/8",
        "2001:db8::zz",
        "a..b",
        ".",
        "*.",
        long_label.as_str(),
        long_name.as_str(),
        "1.2.3.4.5",
    ] {
        assert!(bad.parse::<Destination>().is_err(), "accepted {bad:?}");
    }
}

#[test]
fn cli_rule_grammar() {
    let ok: &[(&str, &str)] = &[
        ("allow@public:tcp:443", "allow@public:tcp:443"),
        ("allow@host:udp:53", "allow@host:udp:53"),
        ("deny:ingress@10.0.0.0/8", "deny:ingress@10.0.0.0/8"),
        ("allow:any@*", "allow:any@*"),
        ("ALLOW:Egress@Public", "allow@public"),
        ("allow:outbound@public", "allow@public"),
        ("deny:inbound@public", "deny:ingress@public"),
        (
            "allow@[2001:db8::/32]:tcp:443",
            "allow@[2001:db8::/32]:tcp:443",
        ),
        ("allow@2001:db8::1", "allow@2001:db8::1"),
        ("allow@2001:db8::/32", "allow@2001:db8::/32"),
        ("allow@[::1]", "allow@::1"),
        (
            "allow@.example.com:tcp+udp:80+443+8000-9000",
            "allow@.example.com:tcp+udp:80+443+8000-9000",
        ),
        ("allow@host:*:53", "allow@host:*:53"),
        ("allow@host:any:53", "allow@host:*:53"),
        ("allow@public:tcp", "allow@public:tcp"),
        ("allow@public:tcp:*", "allow@public:tcp"),
        ("allow@192.0.2.1:icmpv4", "allow@192.0.2.1:icmpv4"),
        ("allow@public:tcp+tcp", "allow@public:tcp"),
    ];
    for (input, shown) in ok {
        let r = RuleSpec::parse_cli(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(r.to_string(), *shown, "{input}");
        assert_eq!(RuleSpec::parse_cli(shown).unwrap(), r, "{shown} round trip");
    }
    let bad: &[(&str, &str)] = &[
        ("allow public", "has no `@`"),
        (
            "permit@public",
            "unknown action `permit`; expected allow or deny",
        ),
        ("allow:sideways@public", "unknown direction `sideways`"),
        ("allow@publc", "unknown group `publc`"),
        (
            "allow@public:tcpp",
            "unknown protocol `tcpp`; expected tcp, udp, icmpv4 or icmpv6",
        ),
        ("allow@public:tcp:0", "port `0` is out of range"),
        ("allow@public:tcp:65536", "out of range"),
        ("allow@public:tcp:9000-8000", "reversed; write 8000-9000"),
        ("allow@public:tcp:80:90", "too many `:`"),
        (
            "allow:ingress@*:icmpv4",
            "icmpv4 is not allowed in a rule with direction `ingress`",
        ),
        ("allow:any@*:tcp+icmpv6", "no inbound ICMP path"),
        ("allow@[2001:db8::1:tcp", "`[` without `]`"),
        ("allow@[2001:db8::1]tcp", "expected `:` after `]`"),
        ("allow@10.0.0.1/8", "host bits set"),
    ];
    for (input, msg) in bad {
        let e = RuleSpec::parse_cli(input).expect_err(input);
        assert!(e.contains(msg), "{input}: {e}");
        assert!(
            e.contains(input),
            "{input}: the message names the rule: {e}"
        );
    }
    let list = RuleSpec::parse_cli_list("allow@public:tcp:443, allow@host:udp:53,").unwrap();
    assert_eq!(list.len(), 2);
    assert!(RuleSpec::parse_cli_list("allow@public,bogus").is_err());
}

#[test]
fn publish_grammar() {
    let ok: &[(&str, &str)] = &[
        ("8080:80", "127.0.0.1:8080:80"),
        ("8080:80/tcp", "127.0.0.1:8080:80"),
        ("0.0.0.0:5353:53/udp", "0.0.0.0:5353:53/udp"),
        ("[::1]:8080:80", "[::1]:8080:80"),
        ("[::]:1:65535/udp", "[::]:1:65535/udp"),
    ];
    for (input, shown) in ok {
        let p: PublishSpec = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(p.to_string(), *shown);
        assert_eq!(shown.parse::<PublishSpec>().unwrap(), p);
    }
    for bad in [
        "80",
        "a:80",
        "8080:0",
        "8080:80/sctp",
        "1.2.3:8080:80",
        "[::1:8080:80",
        "0:80",
        "1:2:3:4",
    ] {
        let e = bad.parse::<PublishSpec>().expect_err(bad);
        assert!(
            e.contains("expected [BIND:]HOST_PORT:GUEST_PORT[/udp]"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn address_map() {
    let sa = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
    let cases: &[(&str, &str, Option<&str>)] = &[
        (
            "203.0.113.7:80=127.0.0.1:8080",
            "203.0.113.7:80",
            Some("127.0.0.1:8080"),
        ),
        ("203.0.113.7:80=127.0.0.1:8080", "203.0.113.7:81", None),
        ("203.0.113.7:80=127.0.0.1:8080", "203.0.113.8:80", None),
        (
            "203.0.113.7:80=127.0.0.1:8080",
            "[::ffff:203.0.113.7]:80",
            Some("127.0.0.1:8080"),
        ),
        (
            "203.0.113.7=127.0.0.1",
            "203.0.113.7:443",
            Some("127.0.0.1:443"),
        ),
        (
            "203.0.113.7=127.0.0.1:9",
            "203.0.113.7:443",
            Some("127.0.0.1:9"),
        ),
        (
            "203.0.113.7:53=127.0.0.1",
            "203.0.113.7:53",
            Some("127.0.0.1:53"),
        ),
        (
            "[2001:db8::1]:443=[::1]:8443",
            "[2001:db8::1]:443",
            Some("[::1]:8443"),
        ),
        ("2001:db8::1=::1", "[2001:db8::1]:22", Some("[::1]:22")),
        // Without brackets a trailing :443 is part of the IPv6 address (2001:db8::1:443).
        (
            "2001:db8::1:443=::1",
            "[2001:db8::1:443]:7",
            Some("[::1]:7"),
        ),
        (
            "2001:db8::1=127.0.0.1",
            "[2001:db8::1]:22",
            Some("127.0.0.1:22"),
        ),
        (
            "[2001:db8::1]=127.0.0.1:8080",
            "[2001:db8::1]:1",
            Some("127.0.0.1:8080"),
        ),
    ];
    for (spec, dst, want) in cases {
        let e: AddressMapEntry = spec.parse().unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert_eq!(e.map(sa(dst)), want.map(sa), "{spec} for {dst}");
        let again: AddressMapEntry = e.to_string().parse().unwrap();
        assert_eq!(again, e, "{spec} round trip via {e}");
    }
    for bad in [
        "203.0.113.7",
        "203.0.113.7=",
        "=127.0.0.1",
        "203.0.113.7:x=127.0.0.1",
        "203.0.113.7:70000=127.0.0.1",
        "[2001:db8::1]:0=::1",
        "host.example=127.0.0.1",
        "203.0.113.7=0.0.0.0",
        "::=::1",
    ] {
        let e = bad.parse::<AddressMapEntry>().expect_err(bad);
        assert!(e.contains("map `"), "{bad}: {e}");
    }
    let entries: Vec<AddressMapEntry> = vec![
        "203.0.113.7:80=127.0.0.1:8080".parse().unwrap(),
        "203.0.113.7=127.0.0.1:9999".parse().unwrap(),
    ];
    assert_eq!(
        AddressMapEntry::lookup(&entries, sa("203.0.113.7:80")),
        Some(sa("127.0.0.1:8080"))
    );
    assert_eq!(
        AddressMapEntry::lookup(&entries, sa("203.0.113.7:81")),
        Some(sa("127.0.0.1:9999"))
    );
    assert_eq!(
        AddressMapEntry::lookup(&entries, sa("203.0.113.8:81")),
        None
    );
}

#[test]
fn file_loading_by_extension() {
    let dir = std::env::temp_dir().join(format!("netfence-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = dir.join("a.toml");
    std::fs::write(&t, "policy = \"allow-all\"\n").unwrap();
    assert_eq!(
        load(&t).unwrap().policy,
        Some(PolicySpec::Preset(Preset::AllowAll))
    );
    let j = dir.join("a.JSON");
    std::fs::write(&j, r#"{"policy": "non_local"}"#).unwrap();
    assert_eq!(
        load(&j).unwrap().policy,
        Some(PolicySpec::Preset(Preset::NonLocal))
    );
    let y = dir.join("a.yaml");
    std::fs::write(&y, "policy: none\n").unwrap();
    let e = load(&y).unwrap_err();
    assert!(e.to_string().contains("expected .toml or .json"), "{e}");
    assert_eq!(e.exit_code(), 2);
    let missing = dir.join("missing.toml");
    let e = load(&missing).unwrap_err();
    assert!(e.to_string().contains("cannot read the file"), "{e}");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[rules]]\naction = \"allow\"\ndirection = \"ingress\"\nprotocol = \"icmpv6\"\n",
    )
    .unwrap();
    let e = load(&bad).unwrap_err();
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!(
            "{}: rules[0].protocol = \"icmpv6\": ICMP",
            bad.display()
        )),
        "{shown}"
    );
    let bad2 = dir.join("bad2.toml");
    std::fs::write(
        &bad2,
        "\n\n[[rules]]\naction = \"allow\"\ndestination = \"publc\"\n",
    )
    .unwrap();
    let shown = load(&bad2).unwrap_err().to_string();
    assert!(
        shown.contains("rules[0].destination: unknown group"),
        "{shown}"
    );
    assert!(shown.contains("(line 5)"), "{shown}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn effective_policy_resolution() {
    let e = NetworkConfig::default().effective_policy();
    assert_eq!(
        (e.preset, e.implicit_preset),
        (Some(Preset::PublicOnly), true)
    );
    assert_eq!(
        (e.default_egress, e.default_ingress),
        (Action::Deny, Action::Allow)
    );
    let c = parse_and_validate("policy = \"none\"", Format::Toml)
        .unwrap()
        .effective_policy();
    assert_eq!(
        (c.default_egress, c.default_ingress),
        (Action::Deny, Action::Deny)
    );
    let c = parse_and_validate("policy = \"allow-all\"", Format::Toml)
        .unwrap()
        .effective_policy();
    assert_eq!(
        (c.default_egress, c.default_ingress),
        (Action::Allow, Action::Allow)
    );
    let c = parse_and_validate(
        "policy = \"non-local\"\n[[rules]]\naction = \"deny\"\ndestination = \"10.0.0.0/8\"",
        Format::Toml,
    )
    .unwrap()
    .effective_policy();
    assert_eq!(c.preset, Some(Preset::NonLocal));
    assert!(!c.implicit_preset);
    assert_eq!(c.rules.len(), 1);
    let c = parse_and_validate(
        "[[rules]]\naction = \"allow\"\ndestination = \"host\"",
        Format::Toml,
    )
    .unwrap()
    .effective_policy();
    assert_eq!(c.preset, None);
}

mod cli_args {
    use super::*;
    use crate::config::cli::NetworkArgs;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct T {
        #[command(flatten)]
        net: NetworkArgs,
    }

    fn args(v: &[&str]) -> Result<NetworkArgs, clap::Error> {
        let mut all = vec!["t"];
        all.extend_from_slice(v);
        T::try_parse_from(all).map(|t| t.net)
    }

    fn resolve(v: &[&str]) -> NetworkConfig {
        args(v).unwrap().resolve().unwrap()
    }

    #[test]
    fn defaults_and_presets() {
        let c = resolve(&[]);
        assert_eq!(c, NetworkConfig::default());
        assert_eq!(c.effective_policy().preset, Some(Preset::PublicOnly));
        let c = resolve(&["--policy", "allow_all"]);
        assert_eq!(c.policy, Some(PolicySpec::Preset(Preset::AllowAll)));
        let c = resolve(&["--no-net"]);
        assert_eq!(c.policy, Some(PolicySpec::Preset(Preset::None)));
        let e = args(&["--no-net", "--policy", "allow-all"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = args(&["--policy", "open"]).unwrap_err();
        assert!(
            e.to_string().contains("unknown policy preset `open`"),
            "{e}"
        );
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn rules_and_defaults() {
        // The reference's deny-by-default example.
        let c = resolve(&[
            "--net-default-egress",
            "deny",
            "--net-rule",
            "allow@public:tcp:443,allow@host:udp:53",
        ]);
        let e = c.effective_policy();
        assert_eq!(e.preset, None);
        assert_eq!(e.default_egress, Action::Deny);
        let texts: Vec<String> = e.rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(texts, ["allow@public:tcp:443", "allow@host:udp:53"]);
        // Repeatable.
        let c = resolve(&["--net-rule", "allow@public", "--net-rule", "allow@host"]);
        assert_eq!(c.rules.len(), 2);
        assert_eq!(c.effective_policy().preset, None);
        // A default alone keeps the default preset.
        let c = resolve(&["--net-default-ingress", "deny"]);
        let e = c.effective_policy();
        assert_eq!(e.preset, Some(Preset::PublicOnly));
        assert_eq!(e.default_ingress, Action::Deny);
        assert_eq!(e.default_egress, Action::Deny);
        // A preset plus rules: preset rules first.
        let c = resolve(&["--policy", "non-local", "--net-rule", "deny@10.0.0.5"]);
        let e = c.effective_policy();
        assert_eq!(e.preset, Some(Preset::NonLocal));
        assert_eq!(e.rules.len(), 1);
        // Bad values are clap errors with exit code 2 and the grammar in the message.
        for (v, msg) in [
            (vec!["--net-rule", "allow@publc"], "unknown group `publc`"),
            (
                vec!["--net-rule", "allow:ingress@*:icmpv4"],
                "no inbound ICMP path",
            ),
            (vec!["--net-rule", ","], "empty rule list"),
            (
                vec!["--net-default-egress", "maybe"],
                "expected allow or deny",
            ),
            (vec!["--max-connections", "-3"], "-3"),
            (vec!["-p", "80"], "HOST_PORT:GUEST_PORT"),
            (vec!["--map", "1.2.3.4"], "GUEST_IP[:PORT]=HOST_IP[:PORT]"),
        ] {
            let e = args(&v).unwrap_err();
            assert!(e.to_string().contains(msg), "{v:?}: {e}");
            assert_eq!(e.exit_code(), 2, "{v:?}");
        }
    }

    #[test]
    fn other_options() {
        let c = resolve(&[
            "-p",
            "8080:80",
            "--publish",
            "0.0.0.0:5353:53/udp",
            "--map",
            "203.0.113.7:80=127.0.0.1:8080",
            "--map",
            "[2001:db8::1]:443=[::1]:8443",
            "--reject",
            "--max-connections",
            "5",
        ]);
        assert_eq!(c.ports.len(), 2);
        assert_eq!(c.map.len(), 2);
        assert_eq!(c.deny_action, DenyAction::Reject);
        assert_eq!(c.max_connections, Some(5));
        let e = args(&["-p", "8080:80", "-p", "8080:81"])
            .unwrap()
            .resolve()
            .unwrap_err();
        assert_eq!(e.field, "ports[1]");
        assert_eq!(e.exit_code(), 2);
        let e = args(&["--max-connections", "0"])
            .unwrap()
            .resolve()
            .unwrap_err();
        assert_eq!(e.field, "max_connections");
    }

    #[test]
    fn merge_over_file() {
        let dir = std::env::temp_dir().join(format!("netfence-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("net.toml");
        std::fs::write(
            &f,
            r#"
map = ["203.0.113.7:80=127.0.0.1:1", "203.0.113.8=127.0.0.1"]
ports = ["8080:80"]
max_connections = 10
[policy]
default_egress = "deny"
rules = [{ action = "allow", destination = "public", protocol = "tcp", port = 443 }]
[[rules]]
action = "allow"
destination = "host"
"#,
        )
        .unwrap();
        let fs = f.to_str().unwrap();
        let c = resolve(&["--config", fs]);
        assert_eq!(c.effective_policy().rules.len(), 2);
        let c = resolve(&[
            "--config",
            fs,
            "--net-rule",
            "deny@10.0.0.0/8",
            "--net-default-egress",
            "allow",
            "--max-connections",
            "3",
            "-p",
            "8080:81",
            "--map",
            "203.0.113.7:80=127.0.0.1:2",
        ]);
        let e = c.effective_policy();
        let texts: Vec<String> = e.rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            texts,
            ["allow@public:tcp:443", "allow@host", "deny@10.0.0.0/8"]
        );
        assert_eq!(e.default_egress, Action::Allow);
        assert_eq!(e.preset, None);
        assert_eq!(c.max_connections, Some(3));
        assert_eq!(
            c.ports.len(),
            1,
            "the command line replaces the same host port"
        );
        assert_eq!(c.ports[0].guest_port, 81);
        assert_eq!(c.map.len(), 2);
        assert_eq!(c.map[0].to_string(), "203.0.113.7:80=127.0.0.1:2");
        // --policy over a table keeps the table's rules after the preset.
        let c = resolve(&["--config", fs, "--policy", "public-only"]);
        let e = c.effective_policy();
        assert_eq!(e.preset, Some(Preset::PublicOnly));
        assert_eq!(e.rules.len(), 2);
        assert_eq!(e.default_egress, Action::Deny);
        // Errors in the file name the file.
        let bad = dir.join("bad.json");
        std::fs::write(
            &bad,
            r#"{"rules": [{"action": "allow", "port": "9000-8000"}]}"#,
        )
        .unwrap();
        let e = args(&["--config", bad.to_str().unwrap()])
            .unwrap()
            .resolve()
            .unwrap_err();
        assert_eq!(e.file.as_deref(), Some(bad.as_path()));
        assert_eq!(e.field, "rules[0].port");
        assert!(e.to_string().contains("reversed"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// A map entry covers its guest address in every spelling policy judges as that address
/// (mapped, NAT64, 6to4), and two entries for spellings of one address are duplicates.
#[test]
fn map_covers_every_spelling_of_its_key() {
    let e: AddressMapEntry = "203.0.113.7=127.0.0.1:8080".parse().unwrap();
    for dst in [
        "203.0.113.7:80",
        "[::ffff:203.0.113.7]:80",
        "[64:ff9b::cb00:7107]:80",
        "[64:ff9b:1:cb00:71:700::]:80",
        "[2002:cb00:7107::1]:80",
    ] {
        assert_eq!(
            e.map(dst.parse().unwrap()),
            Some("127.0.0.1:8080".parse().unwrap()),
            "{dst}"
        );
    }
    assert_eq!(e.map("[2001:db8::cb00:7107]:80".parse().unwrap()), None);
    let cfg = NetworkConfig {
        map: vec![
            "203.0.113.7=127.0.0.1".parse().unwrap(),
            "64:ff9b::cb00:7107=::1".parse().unwrap(),
        ],
        ..Default::default()
    };
    let err = cfg.validate().unwrap_err();
    assert_eq!(err.field, "map[1]");
    assert!(err.message.contains("already mapped by map[0]"), "{err}");
}

#[test]
fn secret_value_errors_never_show_the_value() {
    for text in [
        "[[secrets]]\nenv_var = \"A\"\nvalue = 987654321\nallowed_hosts = [\"a.example\"]",
        "[[secrets]]\nenv_var = \"A\"\nvalue = [\"987654321\"]\nallowed_hosts = [\"a.example\"]",
        "[[secrets]]\nenv_var = \"A\"\nvalue = \"987654321\\r\"\nallowed_hosts = [\"a.example\"]",
        "[[secrets]]\nenv_var = \"A\"\nvalue = \"987654321\"\nvalue_env = \"X\"\nallowed_hosts = [\"a.example\"]",
    ] {
        for format in [Format::Toml, Format::Json] {
            let text = match format {
                Format::Toml => text.to_string(),
                Format::Json => {
                    let cfg: toml::Value = toml::from_str(text).unwrap();
                    serde_json::to_string(&cfg).unwrap()
                }
            };
            let e = parse_and_validate(&text, format).expect_err(&text);
            assert!(!format!("{e} {e:?}").contains("987654321"), "{text}: {e}");
            assert!(e.field.starts_with("secrets[0]"), "{text}: {e}");
        }
    }
}

#[test]
fn derived_placeholders_are_stable_and_distinct() {
    let a = default_placeholder("API");
    assert_eq!(a, default_placeholder("API"), "the same on every start");
    assert!(a.starts_with("NETFENCE_PLACEHOLDER_API_"), "{a}");
    assert_eq!(a.len(), "NETFENCE_PLACEHOLDER_API_".len() + 32);
    // Documented: the first 32 hex digits of SHA-256("netfence-placeholder-v1:API").
    let digest = ring::digest::digest(&ring::digest::SHA256, b"netfence-placeholder-v1:API");
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(a, format!("NETFENCE_PLACEHOLDER_API_{hex}"));
    // `API` and `API_2` would be prefixes of each other without the hash.
    let b = default_placeholder("API_2");
    assert!(!b.starts_with(&a) && !a.starts_with(&b));
    let longest = default_placeholder(&"X".repeat(ENV_VAR_MAX_LEN));
    assert!(
        PLACEHOLDER_LEN.contains(&longest.len()),
        "{}",
        longest.len()
    );
    let cfg = parse_and_validate(
        "[[secrets]]\nenv_var = \"API\"\nvalue = \"v\"\nallowed_hosts = [\"a.example\"]\n\
         [[secrets]]\nenv_var = \"API_2\"\nvalue = \"w\"\nallowed_hosts = [\"a.example\"]",
        Format::Toml,
    )
    .unwrap();
    assert_eq!(cfg.secrets[0].effective_placeholder(), a);
    assert_eq!(
        cfg.secrets[1].effective_substitute_in(),
        [SubstitutePart::Headers],
        "headers by default"
    );
}
