//! /etc/distcc-agent/agent.toml: see `distcc_agent::fuzzing::agent_config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| distcc_agent::fuzzing::agent_config(data));
