//! The SNI gate: a middle stage that holds a TLS flow's first bytes until its name is decided.
//!
//! On a TLS port under domain rules, the host side is dialled at the SYN like any TCP flow and
//! the guest's handshake completes when the host is up; then the guest's bytes stay in the
//! guest end's receive buffer (nothing goes upstream, the host is not read) until the
//! ClientHello is complete, times out (`hello-timeout-secs`) or the guest gives up. The flow
//! engine then judges the SNI ([`crate::tls::sni`] says what the bytes were) and either opens
//! the gate — the held bytes go upstream untouched, as if the gate had never been there — or
//! resets both ends. The gate only peeks: it never consumes or copies the guest's bytes.

use std::time::{Duration, Instant};

use smoltcp::socket::tcp;

use crate::tls::sni::{scan_client_hello, ClientHelloScan};

/// Bytes of ClientHello read at most.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// A flow's gate, from the moment the guest end exists.
#[derive(Debug, Clone, Copy)]
pub struct SniGate {
    pub since: Instant,
}

/// What the gate knows now.
#[derive(Debug, PartialEq, Eq)]
pub enum GateStatus {
    /// The hello is not complete yet and there is time left.
    Waiting,
    /// The hello is in (or will never be): judge this.
    Ready(ClientHelloScan),
    /// The hello did not arrive in time.
    TimedOut,
}

impl SniGate {
    pub fn new(now: Instant) -> Self {
        SniGate { since: now }
    }

    /// Looks at the guest's bytes so far.
    pub fn poll(
        &self,
        sock: &mut tcp::Socket<'static>,
        now: Instant,
        timeout: Duration,
    ) -> GateStatus {
        let scan = if sock.can_recv() {
            match sock.peek(MAX_CLIENT_HELLO) {
                Ok(buf) => scan_client_hello(buf, MAX_CLIENT_HELLO),
                Err(_) => ClientHelloScan::NotTls,
            }
        } else {
            ClientHelloScan::NeedMore
        };
        if scan != ClientHelloScan::NeedMore {
            return GateStatus::Ready(scan);
        }
        // Before the handshake completes smoltcp reports "may not receive": that is not the
        // guest giving up.
        let handshaking = matches!(sock.state(), tcp::State::Listen | tcp::State::SynReceived);
        let guest_gave_up = !handshaking && !sock.may_recv();
        if guest_gave_up {
            GateStatus::Ready(ClientHelloScan::NeedMore)
        } else if now.duration_since(self.since) >= timeout {
            GateStatus::TimedOut
        } else {
            GateStatus::Waiting
        }
    }
}
