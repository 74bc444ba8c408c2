//! cargo fuzz target `fragments`: runs `netfence::fuzzing::run("fragments", ...)` (see `src/fuzzing/` for
//! its input format and the properties it asserts).
//! libFuzzer -max_len: 8192 (read by scripts/fuzz.sh; the same as the target's `max_len`)
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| netfence::fuzzing::run("fragments", data));
