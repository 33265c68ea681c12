#!/usr/bin/env bash
# Everything a fresh machine needs beyond the Rust toolchain: the default model and a Python
# environment with the official `openai` client (used by the API tests). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import openai" 2>/dev/null; then
  echo "creating .venv with the openai client..."
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r tests/python/requirements.txt
fi
