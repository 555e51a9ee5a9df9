#!/usr/bin/env bash
# One install path for users and CI: a virtualenv with torch, fastreid (without its stale pins),
# faiss, onnx/onnxruntime, reidzoo itself (editable) and the dev tools.
#   bash scripts/install.sh          # CPU (faiss-cpu)
#   bash scripts/install.sh --gpu    # GPU machine (faiss-gpu instead of faiss-cpu)
# Idempotent: a second run with unchanged requirements only checks the imports.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REIDZOO_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRA="cpu"
if [[ "${1:-}" == "--gpu" ]]; then EXTRA="gpu"; fi

TORCH="torch==2.14.1"
TORCHVISION="torchvision==0.29.1"
FASTREID="fastreid==1.4.0"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[install] creating virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

STAMP="$VENV/.reidzoo-install-stamp"
SIG="$( (cat "$0" "$ROOT/pyproject.toml"; echo "$EXTRA") | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$SIG" ]] \
    && "$PY" -c "import torch, torchvision, fastreid, faiss, onnxruntime, reidzoo" 2>/dev/null; then
    echo "[install] up to date ($VENV)"
    exit 0
fi

echo "[install] pip, setuptools"
"${PIP[@]}" install --upgrade "pip>=23" "setuptools>=64" wheel
echo "[install] $TORCH $TORCHVISION"
"${PIP[@]}" install "$TORCH" "$TORCHVISION"
echo "[install] $FASTREID without its dependency pins (it pins torch==1.13.1)"
"${PIP[@]}" install --no-deps "$FASTREID"
# Everything else comes from reidzoo's own metadata (fastreid's real runtime needs included).
# A constraint keeps pip from replacing the torch installed above.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf '%s\n%s\n' "$TORCH" "$TORCHVISION" > "$CONSTRAINTS"
echo "[install] reidzoo (editable) with extras [$EXTRA,dev]"
"${PIP[@]}" install -c "$CONSTRAINTS" -e "$ROOT[$EXTRA,dev]"
"$PY" -c "import importlib.metadata as m, torch, faiss, onnxruntime, reidzoo; print('[install] ok: torch', torch.__version__, '| fastreid', m.version('fastreid'), '| faiss', faiss.__version__)"
echo "$SIG" > "$STAMP"
