//! Distcc's binstate_PID state files, as `builderctl monitor` reads them: see `distcc_builder::fuzzing::state_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| distcc_builder::fuzzing::state_file(data));
