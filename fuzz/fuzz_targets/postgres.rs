//! `postgres`: see `bakeoff_protocol::harness::postgres` for the input format and the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bakeoff_protocol::harness::postgres(data);
});
