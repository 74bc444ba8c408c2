//! Domain names as the policy sees them, and the name lists of `deny_domains` /
//! `deny_domain_suffixes`.
//!
//! Every name that crosses into policy code is *normalized* first: ASCII lower case, without the
//! trailing root dot. `Example.COM.` and `example.com` are the same name. A suffix entry
//! (`example.com` or `.example.com`, the leading dot is optional) covers the apex itself and every
//! name below it, label-aligned: `a.b.example.com` matches, `badexample.com` does not.

use std::collections::HashSet;
use std::net::IpAddr;

use hickory_proto::rr::Name;
use ipnet::IpNet;

use super::DomainJudge;

/// Lower-cases `name` and strips one trailing dot (and surrounding white space).
pub fn normalize_name(name: &str) -> String {
    let trimmed = name.trim();
    let trimmed = trimmed.strip_suffix('.').unwrap_or(trimmed);
    trimmed.to_ascii_lowercase()
}

/// The normalized text form of a wire-format name (punycode stays as it is on the wire).
pub fn name_to_string(name: &Name) -> String {
    normalize_name(&name.to_ascii())
}

/// True when `name` is `suffix` or a subdomain of it. Both must already be normalized.
pub fn is_within(name: &str, suffix: &str) -> bool {
    if suffix.is_empty() {
        // The root covers everything.
        return true;
    }
    match name.strip_suffix(suffix) {
        Some("") => true,
        Some(rest) => rest.ends_with('.'),
        None => false,
    }
}

/// A set of exact names and of suffixes (apex + subdomains), matched on normalized names.
#[derive(Clone, Debug, Default)]
pub struct DomainSet {
    exact: HashSet<String>,
    suffixes: Vec<String>,
}

impl DomainSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an exact name (`deny_domains` entry).
    pub fn add_exact(&mut self, name: &str) {
        self.exact.insert(normalize_name(name));
    }

    /// Adds a suffix (`deny_domain_suffixes` entry); a leading dot is accepted and ignored.
    pub fn add_suffix(&mut self, suffix: &str) {
        let normalized = normalize_name(suffix);
        let normalized = normalized.trim_start_matches('.').to_string();
        if !self.suffixes.contains(&normalized) {
            self.suffixes.push(normalized);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.suffixes.is_empty()
    }

    /// Returns the entry that covers `name` (normalizing it first): `"example.com"` for an exact
    /// match, `".example.com"` for a suffix match.
    pub fn matching_entry(&self, name: &str) -> Option<String> {
        let name = normalize_name(name);
        if self.exact.contains(&name) {
            return Some(name);
        }
        self.suffixes
            .iter()
            .find(|s| is_within(&name, s))
            .map(|s| format!(".{s}"))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.matching_entry(name).is_some()
    }
}

/// A self-contained [`DomainJudge`]: a deny list of names and a list of explicitly allowed
/// addresses / ranges. Useful on its own (no policy rules) and in tests.
#[derive(Clone, Debug, Default)]
pub struct StaticJudge {
    pub deny: DomainSet,
    pub allow_ips: Vec<IpNet>,
}

impl DomainJudge for StaticJudge {
    fn domain_denied(&self, name: &str) -> Option<String> {
        self.deny
            .matching_entry(name)
            .map(|entry| format!("deny list entry {entry}"))
    }

    fn explicitly_allows_ip(&self, ip: IpAddr) -> bool {
        self.allow_ips.iter().any(|net| net.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_lowercases_and_strips_trailing_dot() {
        assert_eq!(normalize_name("WWW.Example.COM."), "www.example.com");
        assert_eq!(normalize_name("example.com"), "example.com");
        assert_eq!(normalize_name(" example.com. "), "example.com");
        assert_eq!(normalize_name("."), "");
    }

    #[test]
    fn wire_names_are_normalized() {
        let name = Name::from_ascii("Api.Example.Com.").unwrap();
        assert_eq!(name_to_string(&name), "api.example.com");
    }

    #[test]
    fn within_is_label_aligned() {
        assert!(is_within("example.com", "example.com"));
        assert!(is_within("a.example.com", "example.com"));
        assert!(is_within("a.b.example.com", "example.com"));
        assert!(!is_within("badexample.com", "example.com"));
        assert!(!is_within("example.com.evil", "example.com"));
        assert!(!is_within("com", "example.com"));
    }

    #[test]
    fn domain_set_exact_and_suffix() {
        let mut set = DomainSet::new();
        set.add_exact("Blocked.Example.");
        set.add_suffix(".tracking.com");
        set.add_suffix("ads.net");
        assert!(set.contains("blocked.example"));
        assert!(set.contains("BLOCKED.EXAMPLE."));
        assert!(
            !set.contains("sub.blocked.example"),
            "exact entries cover only the name"
        );
        assert!(set.contains("tracking.com"), "suffix covers the apex");
        assert!(set.contains("a.b.Tracking.com."));
        assert!(set.contains("ads.net"));
        assert!(!set.contains("notads.net"));
        assert_eq!(set.matching_entry("x.ads.net").as_deref(), Some(".ads.net"));
        assert_eq!(
            set.matching_entry("blocked.example").as_deref(),
            Some("blocked.example")
        );
    }

    #[test]
    fn static_judge_allows_listed_ranges() {
        let judge = StaticJudge {
            deny: DomainSet::new(),
            allow_ips: vec!["10.1.0.0/16".parse().unwrap()],
        };
        assert!(judge.explicitly_allows_ip("10.1.2.3".parse().unwrap()));
        assert!(!judge.explicitly_allows_ip("10.2.0.1".parse().unwrap()));
        assert!(judge.domain_denied("x.com").is_none());
    }
}
