//! Distccd's --stats page, as the agent reads it: see `distcc_agent::fuzzing::stats_page`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| distcc_agent::fuzzing::stats_page(data));
