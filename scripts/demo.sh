#!/usr/bin/env bash
# Sets up everything on a fresh machine (see setup.sh), then runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python demo/demo.py "$@"
