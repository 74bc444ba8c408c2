//! cargo fuzz target `config`: runs `netfence::fuzzing::target("config")` (see `src/fuzzing/` for
//! its input format and the properties it asserts).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (netfence::fuzzing::target("config").expect("a fuzz target").run)(data);
});
