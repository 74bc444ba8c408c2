//! cargo fuzz target `dns_answer`: runs `netfence::fuzzing::target("dns_answer")` (see `src/fuzzing/` for
//! its input format and the properties it asserts).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (netfence::fuzzing::target("dns_answer").expect("a fuzz target").run)(data);
});
