//! netfence: a vhost-user-net backend that applies a first-match-wins network policy to every
//! new flow of a guest and carries the allowed ones over ordinary host sockets.
//!
//! The path of a frame, module by module:
//! `device` (virtqueues, descriptor chains) -> `link` (classify, source validation, gateway
//! services) -> `flow` (decide with `policy`, then tcp/udp/icmp flows to host sockets), with
//! `stack` (smoltcp: the guest-facing TCP endpoints and frame builders) between link and flows.
//! `server` accepts VMM connections; `config` holds the user-facing model, `explain` the
//! check/lint/config subcommands, `dns` the gateway resolver, `tls` the ClientHello scanner,
//! `secrets` placeholder substitution in HTTP requests and violation detection, `limits` every
//! bound on guest-driven state, `observe` counters and log gates, `control` the operator's side
//! (control socket, live reload, metrics), `confine` the seccomp filter, landlock rules and user
//! change that follow start-up. `fuzzing` holds the fuzz target bodies, shared by `fuzz/` and
//! the regression tests.

pub mod config;
pub mod confine;
pub mod control;
pub mod device;
pub mod dns;
pub mod explain;
pub mod flow;
#[doc(hidden)]
pub mod fuzzing;
pub mod ingress;
pub mod limits;
pub mod link;
pub mod observe;
pub mod policy;
pub mod secrets;
pub mod server;
pub mod stack;
pub mod tls;
