//! The binaries under test: where they are, built once per run when a test asks first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Runs the binaries in `dir` instead of building them (a program that ships beside them, as
/// netsim does). `false` if the binaries were chosen already.
pub fn use_bins_in(dir: &Path) -> bool {
    DIR.set(dir.to_path_buf()).is_ok()
}

/// Directory holding the binaries under test: the one `use_bins_in` gave, or else (a test
/// executable in `target/<profile>/deps`) that profile's, built once per test run.
pub fn bin_dir() -> &'static Path {
    DIR.get_or_init(|| {
        // target/<profile>/deps/e2e-<hash> → target/<profile>
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe.parent().and_then(Path::parent).expect("target profile dir").to_path_buf();
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "shoal-agent", "-p", "shoal-coordinator", "-p", "shoal-relay", "--bins"]);
        // The test-only switches (a peer or a relay serving bad bytes), as the tests' own build has.
        cmd.args(["--features", "shoal-agent/test-faults,shoal-relay/test-faults"]);
        // The variables cargo sets for a running test are not the outer build's: a build script
        // that reruns when one changes (ring's watches CARGO_MANIFEST_DIR) would rebuild half the
        // tree here, and again on the next `cargo test`.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            let set_for_tests = [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
            ]
            .contains(&k.as_ref())
                || k.starts_with("CARGO_PKG_");
            if set_for_tests {
                cmd.env_remove(k.as_ref());
            }
        }
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build for the binaries");
        assert!(status.success(), "building the binaries failed");
        dir
    })
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}
