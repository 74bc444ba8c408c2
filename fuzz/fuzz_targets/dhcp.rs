//! cargo fuzz target `dhcp`: runs `netfence::fuzzing::target("dhcp")` (see `src/fuzzing/` for
//! its input format and the properties it asserts).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    (netfence::fuzzing::target("dhcp").expect("a fuzz target").run)(data);
});
