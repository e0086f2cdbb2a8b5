//! The builder's fuzz targets' seeds and every crash they found, replayed on stable
//! through the same entry functions (`distcc_builder::fuzzing`): a fixed crash stays fixed
//! without nightly.

use distcc_builder::fuzzing;
use distcc_testbed::fuzz_corpus::replay_fuzz_inputs;

#[test]
fn builder_host_list_inputs_hold() {
    replay_fuzz_inputs("builder_host_list", fuzzing::host_list_from_status_bytes);
}

#[test]
fn state_file_inputs_hold() {
    replay_fuzz_inputs("state_file", fuzzing::state_file);
}

#[test]
fn builder_config_inputs_hold() {
    replay_fuzz_inputs("builder_config", fuzzing::builder_config);
}
