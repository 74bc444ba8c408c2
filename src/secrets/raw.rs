//! The secrets stage for a cleartext TCP stream netfence does not parse as HTTP: it never
//! substitutes, and reports a placeholder as a violation unless the destination is bound to a
//! name the secret allows (a name the guest resolved for the destination address, or a
//! verified SNI). The automaton's state is all it keeps between pieces: O(1) per byte, no
//! buffer, and a placeholder split anywhere is still found.

use std::sync::Arc;

use super::set::{context_host, ScanState, SecretSet};
use super::{HostContext, Violation, ViolationReason};

/// Scans one direction of one stream for placeholders.
#[derive(Debug)]
pub struct PlaceholderScanner {
    secrets: Arc<SecretSet>,
    /// Per secret: its placeholder may pass on this stream.
    allowed: Vec<bool>,
    state: ScanState,
    host: String,
    port: u16,
    failed: Option<Violation>,
}

impl PlaceholderScanner {
    pub fn new(secrets: Arc<SecretSet>, ctx: &HostContext) -> Self {
        let allowed = secrets.raw_allowed(ctx);
        let state = secrets.start();
        PlaceholderScanner {
            secrets,
            allowed,
            state,
            host: context_host(ctx),
            port: ctx.port,
            failed: None,
        }
    }

    /// Scans the next bytes of the stream; the caller forwards them unchanged when this is
    /// `Ok`. After a violation every call returns it again.
    pub fn scan(&mut self, input: &[u8]) -> Result<(), Violation> {
        if let Some(v) = &self.failed {
            return Err(v.clone());
        }
        for &b in input {
            if let Some(i) = self.secrets.step(&mut self.state, b) {
                if !self.allowed[i] {
                    let secret = self.secrets.secret(i);
                    let v = Violation {
                        secret: secret.env_var.clone(),
                        host: self.host.clone(),
                        port: self.port,
                        action: secret.action,
                        reason: ViolationReason::RawStream,
                    };
                    self.failed = Some(v.clone());
                    return Err(v);
                }
            }
        }
        Ok(())
    }

    /// Bytes held between calls: none.
    pub fn buffered(&self) -> usize {
        0
    }
}
