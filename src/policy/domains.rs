//! Questions the TLS first-flight check asks of a policy: can a name change a decision here?

use super::{Destination, Policy, Reason};

impl Policy {
    /// Whether any rule or deny list names domains, so that a name (from DNS or a TLS SNI) can
    /// change the decision for an address.
    pub fn has_domain_rules(&self) -> bool {
        !self.deny_domains.is_empty()
            || !self.deny_suffixes.is_empty()
            || self
                .rules
                .iter()
                .any(|r| matches!(r.dest, Destination::Domain(_) | Destination::Suffix(_)))
    }

    /// Whether `reason` is a rule whose destination is a domain or a `.suffix`.
    pub fn is_domain_rule(&self, reason: &Reason) -> bool {
        match reason {
            Reason::Rule { index, .. } => self.rules.iter().any(|r| {
                r.index == *index
                    && matches!(r.dest, Destination::Domain(_) | Destination::Suffix(_))
            }),
            Reason::DenyDomain(_) | Reason::DenyDomainSuffix(_) => true,
            _ => false,
        }
    }
}
