//! TLS handling at the gateway: reading the server name (SNI) from a guest's first flight, so
//! that domain rules can judge a TLS connection by the name it asks for (`sni`), and the parts
//! of interception: the CA that signs the certificates shown to guests (`ca`), a link's cache of
//! those leaf certificates (`leaves`), and the settings that turn `[tls]` into rustls
//! configurations for both sides of an intercepted connection (`settings`).

pub mod ca;
pub mod leaves;
pub mod settings;
pub mod sni;

pub use ca::{CaError, InterceptionCa, DEFAULT_CA_CN};
pub use leaves::LeafCache;
pub use settings::{Interception, TlsSettings};
pub use sni::{scan_client_hello, ClientHelloScan, DEFAULT_MAX_CLIENT_HELLO};
