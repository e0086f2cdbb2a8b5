//! /etc/distcc-builder/builder.toml: see `distcc_builder::fuzzing::builder_config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| distcc_builder::fuzzing::builder_config(data));
