//! The agent's fuzz targets' seeds and every crash they found, replayed on stable through
//! the same entry functions (`distcc_agent::fuzzing`): a fixed crash stays fixed without
//! nightly.

use distcc_agent::fuzzing;
use distcc_testbed::fuzz_corpus::replay_fuzz_inputs;

#[test]
fn stats_page_inputs_hold() {
    replay_fuzz_inputs("stats_page", fuzzing::stats_page);
}

#[test]
fn allow_policy_inputs_hold() {
    replay_fuzz_inputs("allow_policy", fuzzing::allow_policy);
}

#[test]
fn settings_round_trip_inputs_hold() {
    replay_fuzz_inputs("settings_round_trip", fuzzing::settings_round_trip);
}

#[test]
fn agent_config_inputs_hold() {
    replay_fuzz_inputs("agent_config", fuzzing::agent_config);
}
