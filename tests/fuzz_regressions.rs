//! The fuzz targets on stable, for CI: every body in `netfence::fuzzing` (the same code the
//! `cargo fuzz` targets in `fuzz/` run) over its committed corpus (`fuzz/corpus/<target>/`:
//! seeds and minimized crash reproducers), its generated seeds, and a few thousand
//! deterministic mutations of them. A failing input is printed in hex; put it in the corpus
//! (and a unit test beside the fix) once fixed.
//!
//! `cargo test --test fuzz_regressions -- --ignored write_seed_corpus` rewrites the committed
//! `seed-*` files from the seeds in the code.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use netfence::fuzzing::{pseudo_random_inputs, target, Target, TARGETS};

/// Deterministic inputs per target, on top of the corpus and seeds.
const RANDOM_INPUTS: usize = 3000;

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn corpus(t: &Target) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir().join("corpus").join(t.name);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a corpus entry").path();
            let bytes = std::fs::read(&path).expect("a readable corpus file");
            (path.display().to_string(), bytes)
        })
        .collect();
    files.sort();
    files
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn run(t: &Target, what: &str, input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| (t.run)(input))).is_err() {
        panic!(
            "fuzz target {} failed on {what} ({} bytes): {}",
            t.name,
            input.len(),
            hex(input)
        );
    }
}

fn regressions(name: &str) {
    let t = target(name).unwrap_or_else(|| panic!("no fuzz target {name}"));
    let files = corpus(t);
    assert!(!files.is_empty(), "{name}: empty corpus");
    for (path, bytes) in &files {
        run(t, path, bytes);
    }
    for (i, seed) in (t.seeds)().iter().enumerate() {
        run(t, &format!("seed {i}"), seed);
    }
    for (i, input) in pseudo_random_inputs(t, RANDOM_INPUTS).iter().enumerate() {
        run(t, &format!("pseudo-random input {i}"), input);
    }
}

macro_rules! regression_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                regressions(stringify!($name));
            }
        )*
        const TESTED: &[&str] = &[$(stringify!($name)),*];
    };
}

regression_tests!(
    classify,
    fragments,
    link,
    dhcp,
    dns_query,
    dns_answer,
    dns_tcp_framer,
    sni,
    secrets_http,
    secrets_raw,
    vhost_user,
    config,
    cli,
);

/// Every target has a test here, a `cargo fuzz` target file calling its body (and naming its
/// `max_len` for scripts/fuzz.sh), and an entry in `fuzz/Cargo.toml`.
#[test]
fn every_target_is_wired() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for t in TARGETS {
        assert!(
            TESTED.contains(&t.name),
            "{} has no regression test",
            t.name
        );
        let file = fuzz_dir()
            .join("fuzz_targets")
            .join(format!("{}.rs", t.name));
        let source =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            source.contains(&format!("fuzzing::run(\"{}\", data)", t.name)),
            "{} does not run its body",
            file.display()
        );
        assert!(
            source.contains(&format!("libFuzzer -max_len: {} ", t.max_len)),
            "{} does not give scripts/fuzz.sh the max_len {}",
            file.display(),
            t.max_len
        );
        assert!(
            manifest.contains(&format!("name = \"{}\"", t.name)),
            "fuzz/Cargo.toml has no [[bin]] {}",
            t.name
        );
    }
    assert_eq!(TESTED.len(), TARGETS.len());
}

/// Rewrites the committed seeds (`fuzz/corpus/<target>/seed-*`) from the code.
#[test]
#[ignore]
fn write_seed_corpus() {
    for t in TARGETS {
        let dir = fuzz_dir().join("corpus").join(t.name);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        for entry in std::fs::read_dir(&dir).expect("corpus directory") {
            let path = entry.expect("an entry").path();
            let stale = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seed-"));
            if stale {
                std::fs::remove_file(&path).expect("remove a stale seed");
            }
        }
        for (i, seed) in (t.seeds)().iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), seed).expect("write a seed");
        }
    }
}
