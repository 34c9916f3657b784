#!/usr/bin/env bash
# Set up .venv if needed, then: PGD-AT teacher -> CC-IBP and CC-Dist students -> verification table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/certkd demo "$@"
