#!/usr/bin/env bash
# One command: install (first time) and run tuneserve on its embedded defaults
# (SQLite + embedded broker in ~/.tuneserve). Arguments go to `tuneserve up`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/tuneserve ] || bash scripts/install.sh
exec .venv/bin/tuneserve up "$@"
