//! netfence: a vhost-user-net backend that applies a first-match-wins network policy to every
//! new flow of a guest and carries the allowed ones over ordinary host sockets.
//!
//! The path of a frame, module by module:
//! `device` (virtqueues, descriptor chains) -> `classify` (headers, new-flow detection)
//! -> `policy` (decision) -> `stack` (smoltcp: ARP, DHCP, gateway ICMP, TCP endpoints)
//! -> `flow` (tcp/udp/icmp flows to host sockets). `datapath` ties them together per queue pair;
//! `config` holds the user-facing model, `explain` the check/lint/config subcommands, `dns` the
//! gateway resolver.

pub mod classify;
pub mod config;
pub mod datapath;
pub mod device;
pub mod dns;
pub mod explain;
pub mod flow;
pub mod fragments;
pub mod gateway_dns;
pub mod policy;
pub mod server;
pub mod stack;
pub mod timer;
pub mod tls;
