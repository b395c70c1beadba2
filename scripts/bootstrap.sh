#!/usr/bin/env bash
# Create ./.venv and install the project with its test extras. Safe to re-run: a stamp keyed by
# the hash of pyproject.toml makes a second run a no-op until the dependencies change.
#
# Packages come through uv (from PyPI: parallel downloads and installs, a fresh install in well
# under a minute where pip alone takes minutes), except torch: pip takes the CPU wheel torch
# 2.13.0 that these machines keep on disk, which uv does not look at (it would fetch a multi-GB
# CUDA build instead). Where uv cannot be installed, pip installs everything.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[bootstrap] creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ]; then
    exit 0
fi
echo "[bootstrap] installing dependencies into .venv (first run only)"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch 2.13.0: the CPU wheel this project is developed against. Where pip would fetch a multi-GB
# CUDA build instead, install a CPU torch in .venv first (e.g. from PyTorch's CPU index): this
# step is skipped when a torch inside the project's range is already there.
if ! .venv/bin/python -c "import torch, sys; v=tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])); sys.exit(0 if (2, 4) <= v < (2, 15) else 1)" 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
if .venv/bin/python -m uv --version >/dev/null 2>&1 || .venv/bin/python -m pip install -q "uv>=0.4"; then
    # The torch above satisfies the project's range, so uv keeps it.
    .venv/bin/python -m uv pip install -q --python .venv/bin/python -e ".[test]"
else
    echo "[bootstrap] uv could not be installed; installing with pip (slower)"
    .venv/bin/python -m pip install -q -e ".[test]"
fi
rm -f .venv/.installed-*
touch "$stamp"
echo "[bootstrap] done"
