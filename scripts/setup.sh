#!/usr/bin/env bash
# Everything a fresh machine needs beyond the Rust toolchain: the default model, a Python
# environment with the official `openai` client (used by the API tests), and from Debian:
# chromium (the A/B page's browser test), postgresql and nginx (the two-replica test, which
# starts its own throwaway cluster and balancer; neither is started here). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import openai" 2>/dev/null; then
  echo "creating .venv with the openai client..."
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r tests/python/requirements.txt
fi
# Debian's packages the tests drive: chromium (tests/ab_page.rs), PostgreSQL's server and nginx
# (tests/replicas.rs), a C++ compiler (the GPU kernels' source compiled for the CPU by the
# tests, model/kernels/cuda_on_cpu). Installing a service package must not start it: the
# tests run their own.
need=()
command -v "${CXX:-c++}" >/dev/null || need+=(g++)
[ -x /usr/bin/chromium ] || need+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
[ -x /usr/sbin/nginx ] || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${need[*]}..."
    apt-get update -qq
    # A policy that answers 101 ("not allowed") keeps the package scripts from starting services.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      policy=/usr/sbin/policy-rc.d
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    [ -z "$policy" ] || rm -f "$policy"
  else
    echo "setup: missing ${need[*]} and this user cannot apt-get install them; \
tests/ab_page.rs and tests/replicas.rs will fail until they are installed (Debian packages)" >&2
  fi
fi
