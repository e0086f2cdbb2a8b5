//! Settings persistence round trip: see `distcc_agent::fuzzing::settings_round_trip`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| distcc_agent::fuzzing::settings_round_trip(data));
