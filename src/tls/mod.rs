//! TLS handling at the gateway. For now: reading the server name (SNI) from a guest's first
//! flight, so that domain rules can judge a TLS connection by the name it asks for.

pub mod sni;

pub use sni::{scan_client_hello, ClientHelloScan, DEFAULT_MAX_CLIENT_HELLO};
