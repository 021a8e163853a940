#!/usr/bin/env bash
# Run the whole suite in a fresh virtualenv on the oldest or the newest supported releases.
#   bash scripts/check_compat.sh minimum   # every dependency at its lower bound (constraints/minimum.txt)
#   bash scripts/check_compat.sh latest    # the newest release of everything, torch included
# A maintainer runs "latest" before a release and when a dependency ships a new major version, to see a
# break before users do; "minimum" whenever a lower bound in pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  minimum) shift; WM_CONSTRAINTS=constraints/minimum.txt exec bash scripts/test.sh "$@" ;;
  latest) shift; WM_TORCH=torch exec bash scripts/test.sh "$@" ;;
  *) echo "usage: bash scripts/check_compat.sh minimum|latest [pytest arguments]" >&2; exit 2 ;;
esac
