#!/usr/bin/env bash
# One install path for users and CI: a virtualenv with torch, fastreid (without its stale pins),
# faiss, onnx/onnxruntime, reidzoo itself (editable) and the dev tools.
#   bash scripts/install.sh          # CPU (faiss-cpu)
#   bash scripts/install.sh --gpu    # GPU machine (faiss-gpu instead of faiss-cpu)
#   bash scripts/install.sh --interop  # also the [interop] test extra (boxmot, openvino); make test
# Idempotent: a second run with unchanged requirements only checks the imports.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REIDZOO_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRA="cpu"
INTEROP=0
for arg in "$@"; do
    case "$arg" in
        --gpu) EXTRA="gpu" ;;
        --interop) INTEROP=1 ;;
        *) echo "[install] unknown option '$arg' (expected --gpu, --interop)" >&2; exit 2 ;;
    esac
done

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
# The [interop] extra has a stamp of its own, so that `make demo` and `make test` (which adds
# it) do not undo each other's stamp.
INTEROP_STAMP="$VENV/.reidzoo-interop-stamp"
install_interop() {
    if [[ "$INTEROP" != 1 ]]; then return 0; fi
    if [[ -f "$INTEROP_STAMP" && "$(cat "$INTEROP_STAMP")" == "$SIG" ]] \
        && "$PY" -c "import boxmot, openvino" 2>/dev/null; then
        echo "[install] interop extra up to date"
        return 0
    fi
    local constraints
    constraints="$(mktemp)"
    printf '%s\n%s\n' "$TORCH" "$TORCHVISION" > "$constraints"
    echo "[install] test extra [interop] (boxmot, openvino; torch kept at $TORCH)"
    "${PIP[@]}" install -c "$constraints" -e "$ROOT[$EXTRA,dev,interop]"
    rm -f "$constraints"
    "$PY" -c "import boxmot, openvino, torch; assert torch.__version__.startswith('${TORCH#torch==}'), torch.__version__"
    echo "$SIG" > "$INTEROP_STAMP"
}
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$SIG" ]] \
    && "$PY" -c "import torch, torchvision, fastreid, faiss, onnxruntime, reidzoo" 2>/dev/null; then
    echo "[install] up to date ($VENV)"
    install_interop
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
install_interop
