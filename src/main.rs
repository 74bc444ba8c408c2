//! netfence command line (in progress).
fn main() {}
