//! The builder's host list from arbitrary WorkerStatus bytes: see `distcc_builder::fuzzing::host_list_from_status_bytes`.
#![no_main]

libfuzzer_sys::fuzz_target!(
    |data: &[u8]| distcc_builder::fuzzing::host_list_from_status_bytes(data)
);
