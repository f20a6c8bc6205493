//! Shared by the integration tests: where the real models are.

use std::path::PathBuf;

/// `models/<file>` if it exists. Absent models skip the test with a message,
/// unless `EDGETUNE_REQUIRE_MODELS` is set (as in `.ci/run`), where a missing
/// model is a failure: CI must never pass by skipping.
pub fn model_file(file: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(file);
    if p.exists() {
        return Some(p);
    }
    if std::env::var_os("EDGETUNE_REQUIRE_MODELS").is_some() {
        panic!(
            "{} is absent and EDGETUNE_REQUIRE_MODELS is set: run models/fetch all",
            p.display()
        );
    }
    eprintln!("skipping: {} is absent (run models/fetch all)", p.display());
    None
}
