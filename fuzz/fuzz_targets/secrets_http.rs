//! cargo fuzz target `secrets_http`: runs `netfence::fuzzing::run("secrets_http", ...)` (see
//! `src/fuzzing/` for its input format and the properties it asserts).
//! libFuzzer -max_len: 4096 (read by scripts/fuzz.sh; the same as the target's `max_len`)
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| netfence::fuzzing::run("secrets_http", data));
