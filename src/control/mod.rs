//! The operator's side of a running netfence: the control socket (`netfence ctl`), live
//! reload (SIGHUP or `ctl reload`) and Prometheus metrics.
//!
//! [`hub`] is where they meet the links: the links keep their state on their own threads and
//! answer requests posted in their mailboxes. [`reload`] re-reads the config files and builds
//! the settings a reload installs, [`socket`] serves `ctl` and [`metrics`] the scrape endpoint.

pub mod hub;
pub mod metrics;
pub mod reload;
pub mod socket;
