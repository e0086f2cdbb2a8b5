//! The allowlist policy, differentially against a 128-bit range check: see `distcc_agent::fuzzing::allow_policy`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| distcc_agent::fuzzing::allow_policy(data));
