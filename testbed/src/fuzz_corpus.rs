//! The fuzz targets' inputs (`fuzz/seeds/TARGET/`, `fuzz/regressions/TARGET/`) for the
//! crates' ordinary tests, which replay them on stable through the same entry functions
//! the fuzz targets call. Not about containers: it lives here because every crate's tests
//! already depend on this one.

use std::path::{Path, PathBuf};

/// The project's `fuzz/` directory.
pub fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Call `entry` with every seed and regression input of `target`, and fail naming each
/// input that panics. Fails when `target` has no seeds, so the replay cannot pass on
/// nothing.
pub fn replay_fuzz_inputs(target: &str, entry: fn(&[u8])) {
    let mut inputs = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(dir) = std::fs::read_dir(fuzz_dir().join(kind).join(target)) else {
            continue;
        };
        inputs.extend(dir.filter_map(Result::ok).map(|entry| entry.path()));
    }
    inputs.sort();
    assert!(
        inputs
            .iter()
            .any(|p| p.components().any(|c| c.as_os_str() == "seeds")),
        "no seeds for {target} under {}",
        fuzz_dir().display()
    );
    let failed: Vec<String> = inputs
        .iter()
        .filter(|path| {
            let bytes = std::fs::read(path).expect("reading a fuzz input");
            std::panic::catch_unwind(|| entry(&bytes)).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(failed.is_empty(), "{target}: these inputs fail: {failed:?}");
}
