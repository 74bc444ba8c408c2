//! Tests of the config model: parsing, validation messages, command-line grammar and merge.

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
