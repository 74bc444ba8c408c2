//! cargo fuzz target `fragments`: runs `netfence::fuzzing::target("fragments")` (see `src/fuzzing/` for
//! its input format and the properties it asserts).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (netfence::fuzzing::target("fragments").expect("a fuzz target").run)(data);
});
