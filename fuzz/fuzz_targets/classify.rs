//! cargo fuzz target `classify`: runs `netfence::fuzzing::run("classify", ...)` (see `src/fuzzing/` for
//! its input format and the properties it asserts).
//! libFuzzer -max_len: 2048 (read by scripts/fuzz.sh; the same as the target's `max_len`)
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| netfence::fuzzing::run("classify", data));
