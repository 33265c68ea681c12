#!/usr/bin/env bash
# The deployed server is built without the lab (`--no-default-features`): this checks that the
# build compiles, carries none of the lab's commands and links none of its chart libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --no-default-features --bin ttarag
help=$(target/debug/ttarag --help)
for cmd in serve index ask model; do
  grep -qE "^  $cmd " <<<"$help" || { echo "serving build lacks \`$cmd\`" >&2; exit 1; }
done
for cmd in bench eval gate; do
  if grep -qE "^  $cmd " <<<"$help"; then echo "serving build carries lab command \`$cmd\`" >&2; exit 1; fi
done
for crate in plotters png dejavu; do
  if cargo tree --locked --no-default-features -e normal -i "$crate" >/dev/null 2>&1; then
    echo "serving build links $crate" >&2; exit 1
  fi
done
echo "serving build: serve, index, ask, model; no lab commands; no plotters, png or dejavu"
