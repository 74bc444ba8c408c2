//! cargo fuzz target `cli`: runs `netfence::fuzzing::target("cli")` (see `src/fuzzing/` for
//! its input format and the properties it asserts).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (netfence::fuzzing::target("cli").expect("a fuzz target").run)(data);
});
