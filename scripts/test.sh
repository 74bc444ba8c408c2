#!/usr/bin/env bash
# The one test command: everything CI runs, on a fresh Debian 12 machine (root or sudo).
#
#   scripts/test.sh
#
# 1. installs the Debian packages (scripts/install-deps.sh; apt only when something is missing)
# 2. builds the guest image (scripts/build-guest.sh; skipped when unchanged)
# 3. cargo build, cargo test (unit, harness and the real-guest QEMU test in tests/guest.rs),
#    cargo fmt --check, cargo clippy --all-targets -- -D warnings
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

step() { printf '\n==> %s\n' "$*"; }

step "install dependencies"
scripts/install-deps.sh

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || { echo "test.sh: cargo not found (install Rust: https://rustup.rs)" >&2; exit 1; }
# rustfmt and clippy are rustup components a minimal toolchain may lack.
if command -v rustup >/dev/null 2>&1; then
    cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
    cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
fi

step "build the guest image"
scripts/build-guest.sh

step "cargo build"
cargo build --all-targets

step "cargo test"
cargo test

step "cargo fmt --check"
cargo fmt --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "all checks passed"
