#!/usr/bin/env bash
# Everything a fresh machine needs beyond the Rust toolchain: the default model, a Python
# environment with the official `openai` client (used by the API tests) and Debian's chromium
# (the A/B page's browser test). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import openai" 2>/dev/null; then
  echo "creating .venv with the openai client..."
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r tests/python/requirements.txt
fi
# Debian's chromium, for the A/B page's browser test (tests/ab_page.rs).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "setup: /usr/bin/chromium is missing and this user cannot apt-get install it; \
tests/ab_page.rs will fail until it is installed (Debian package chromium)" >&2
  fi
fi
