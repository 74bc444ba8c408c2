//! cargo fuzz target `link`: runs `netfence::fuzzing::target("link")` (see `src/fuzzing/` for
//! its input format and the properties it asserts).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (netfence::fuzzing::target("link").expect("a fuzz target").run)(data);
});
