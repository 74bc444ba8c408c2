//! The flow table: every guest flow that was allowed, with its host socket.
//!
//! Host sockets of one link live in one nested epoll instance (edge-triggered), which the vring
//! worker watches as a single fd; each socket is registered with its flow's token. Flows are
//! keyed by (guest source, guest-visible destination).

pub mod addrmap;
pub mod icmp;
pub mod tcp;
pub mod udp;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

pub use tcp::TcpFlow;
pub use udp::UdpFlow;

/// (guest source, guest-visible destination)
pub type FlowKey = (SocketAddr, SocketAddr);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowRef {
    Tcp(FlowKey),
    Udp(FlowKey),
    Echo(icmp::EchoKey),
}

pub struct FlowTable {
    pub epoll: Epoll,
    pub tcp: HashMap<FlowKey, TcpFlow>,
    pub udp: HashMap<FlowKey, UdpFlow>,
    pub echo: HashMap<icmp::EchoKey, icmp::EchoFlow>,
    pub tokens: HashMap<u64, FlowRef>,
    next_token: u64,
}

impl FlowTable {
    pub fn new() -> io::Result<Self> {
        Ok(FlowTable {
            epoll: Epoll::new()?,
            tcp: HashMap::new(),
            udp: HashMap::new(),
            echo: HashMap::new(),
            tokens: HashMap::new(),
            next_token: 1,
        })
    }

    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Flows that count against `max_connections`.
    pub fn len(&self) -> usize {
        self.tcp.len() + self.udp.len() + self.echo.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a host socket and returns the token its events will carry.
    pub fn register(&mut self, fd: RawFd, flow: FlowRef) -> io::Result<u64> {
        let token = self.next_token;
        self.next_token += 1;
        let events = EventSet::IN
            | EventSet::OUT
            | EventSet::READ_HANG_UP
            | EventSet::HANG_UP
            | EventSet::ERROR
            | EventSet::EDGE_TRIGGERED;
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))?;
        self.tokens.insert(token, flow);
        Ok(token)
    }

    /// Drains the ready host-socket events without blocking.
    pub fn ready_events(&self, out: &mut Vec<(FlowRef, EventSet)>) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for ev in &events[..n] {
                if let Some(flow) = self.tokens.get(&ev.data()) {
                    out.push((*flow, ev.event_set()));
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    pub fn remove_tcp(&mut self, key: &FlowKey) -> Option<TcpFlow> {
        let flow = self.tcp.remove(key)?;
        self.tokens.remove(&flow.token);
        Some(flow)
    }

    pub fn remove_echo(&mut self, key: &icmp::EchoKey) -> Option<icmp::EchoFlow> {
        let flow = self.echo.remove(key)?;
        self.tokens.remove(&flow.token);
        Some(flow)
    }

    pub fn remove_udp(&mut self, key: &FlowKey) -> Option<UdpFlow> {
        let flow = self.udp.remove(key)?;
        self.tokens.remove(&flow.token);
        Some(flow)
    }
}
