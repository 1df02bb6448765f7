#!/usr/bin/env bash
# One-time setup: a virtual environment with CPU PyTorch, umlcore (editable) and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
pip install -q --disable-pip-version-check --no-deps -e UMLCore 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch, SimpleITK, safetensors, slicer, umlcore" 
