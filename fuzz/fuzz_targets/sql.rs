//! `sql`: see `bakeoff_protocol::harness::sql` for the input format and the invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bakeoff_protocol::harness::sql(data);
});
