//! Fuzz bodies for what a person writes: config files (TOML and JSON) and the command-line
//! grammars (`--net-rule`, `--map`, `-p`, `--limit`).

use super::Input;
use crate::config::{parse_str, to_toml, AddressMapEntry, Format, NetworkConfig, PublishSpec};
use crate::limits::Limits;
use crate::policy::{Action, Preset, RuleSpec};

/// Input: a byte choosing the format (even: TOML, odd: JSON), then the file's text (inputs
/// that are not UTF-8 are skipped: the loader reads text).
///
/// Holds: no panic in parsing, validation, compilation, `lint` or the policy summary; what
/// parses survives the trip `netfence config` makes: rendered as TOML (and as JSON) it parses
/// back to the same configuration.
pub fn config(data: &[u8]) {
    let mut input = Input::new(data);
    let format = if input.byte() & 1 == 0 {
        Format::Toml
    } else {
        Format::Json
    };
    let Ok(text) = std::str::from_utf8(input.rest()) else {
        return;
    };
    let Ok(cfg) = parse_str(text, format) else {
        return;
    };
    let _ = cfg.effective_policy();
    let host = cfg.gateway_addrs(0);
    if let Ok(policy) = cfg.compile_policy(&host) {
        let _ = crate::explain::PolicySummary::new(&cfg, &policy).to_string();
        let _ = crate::explain::lint(&cfg, &host);
    }
    round_trip(&cfg);
}

fn round_trip(cfg: &NetworkConfig) {
    let toml = to_toml(cfg);
    assert!(!toml.starts_with("# cannot render"), "{toml}");
    match parse_str(&toml, Format::Toml) {
        Ok(back) => assert_eq!(&back, cfg, "through TOML:\n{toml}"),
        Err(e) => panic!("the rendered TOML does not parse: {e}\n{toml}"),
    }
    let json = serde_json::to_string(cfg).expect("a config renders as JSON");
    match parse_str(&json, Format::Json) {
        Ok(back) => assert_eq!(&back, cfg, "through JSON:\n{json}"),
        Err(e) => panic!("the rendered JSON does not parse: {e}\n{json}"),
    }
}

/// Input: a byte choosing the grammar, then the argument's text.
///
/// Holds: no panic; what parses prints in a form that parses back to the same value (rules
/// print the same again: the printed form is canonical); a `--limit` that is accepted changes
/// nothing when applied again.
pub fn cli(data: &[u8]) {
    let mut input = Input::new(data);
    let which = input.byte();
    let Ok(text) = std::str::from_utf8(input.rest()) else {
        return;
    };
    match which % 6 {
        0 => {
            let Ok(rules) = RuleSpec::parse_cli_list(text) else {
                return;
            };
            for rule in rules {
                let printed = rule.to_string();
                let again = RuleSpec::parse_cli(&printed)
                    .unwrap_or_else(|e| panic!("`{printed}` (from `{text}`) does not parse: {e}"));
                assert_eq!(again.to_string(), printed, "from `{text}`");
            }
        }
        1 => {
            if let Ok(entry) = text.parse::<AddressMapEntry>() {
                let printed = entry.to_string();
                assert_eq!(
                    printed.parse::<AddressMapEntry>().as_ref(),
                    Ok(&entry),
                    "`{printed}` from `{text}`"
                );
            }
        }
        2 => {
            if let Ok(spec) = text.parse::<PublishSpec>() {
                let printed = spec.to_string();
                assert_eq!(
                    printed.parse::<PublishSpec>().as_ref(),
                    Ok(&spec),
                    "`{printed}` from `{text}`"
                );
            }
        }
        3 => {
            let mut limits = Limits::default();
            if limits.apply(text).is_ok() {
                let once = limits.clone();
                assert!(limits.apply(text).is_ok());
                assert_eq!(limits, once, "`{text}` applied twice");
            }
        }
        4 => {
            if let Ok(preset) = text.parse::<Preset>() {
                assert_eq!(preset.to_string().parse::<Preset>(), Ok(preset));
            }
        }
        _ => {
            if let Ok(action) = text.parse::<Action>() {
                assert_eq!(action.to_string().parse::<Action>(), Ok(action));
            }
        }
    }
}

fn with_choice(choice: u8, text: &str) -> Vec<u8> {
    let mut seed = vec![choice];
    seed.extend_from_slice(text.as_bytes());
    seed
}

pub fn config_seeds() -> Vec<Vec<u8>> {
    let toml = [
        "policy = \"public-only\"\n",
        "policy = \"none\"\n",
        r#"
policy = { preset = "public-only", default_egress = "deny" }
deny_domains = ["ads.example.com"]
deny_domain_suffixes = [".tracking.example"]
map = ["203.0.113.7:80=127.0.0.1:8080", "[2001:db8::1]:443=[::1]:8443"]
max_connections = 100
ipv4_pool = "10.10.0.0/16"

[[rules]]
action = "allow"
destination = "host"
protocol = "tcp"
port = 8080

[[rules]]
action = "deny"
direction = "any"
destination = { kind = "cidr", value = "10.0.0.0/8" }

[dns]
rebind_protection = false
"#,
        r#"
[policy]
default_egress = "allow"
rules = [{ action = "deny", destination = ".example.com", ports = ["80", "8000-9000"] }]
[tls]
enabled = false
intercepted_ports = [443, 8443]
"#,
    ];
    let json = [
        r#"{"policy":"allow-all","rules":[{"action":"deny","destination":"metadata"}]}"#,
        r#"{"policy":{"preset":"non-local","rules":[{"action":"allow","destination":"api.example.com","protocol":"tcp","port":443}]},"ports":["8080:80"],"deny_action":"reject"}"#,
    ];
    toml.iter()
        .map(|t| with_choice(0, t))
        .chain(json.iter().map(|j| with_choice(1, j)))
        .collect()
}

pub fn cli_seeds() -> Vec<Vec<u8>> {
    [
        (0, "allow@public:tcp:443,allow@host:udp:53"),
        (0, "deny:ingress@10.0.0.0/8"),
        (0, "allow@[2001:db8::/32]:tcp+udp:443+8000-9000"),
        (0, "allow@.example.com,deny@api.example.com:*:80"),
        (1, "203.0.113.7:80=127.0.0.1:8080"),
        (1, "[2001:db8::7]:443=[::1]:8443"),
        (1, "2001:db8::9=::1"),
        (2, "8080:80"),
        (2, "0.0.0.0:5353:53/udp"),
        (2, "[::1]:8080:80/tcp"),
        (3, "tcp-flows=1000"),
        (3, "udp-idle=1.5"),
        (4, "public-only"),
        (5, "allow"),
    ]
    .iter()
    .map(|(choice, text)| with_choice(*choice, text))
    .collect()
}
