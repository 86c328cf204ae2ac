"""Fill ``.gpu/`` (git-ignored) with what ``scripts/gpu_evidence.sh`` needs on a lent GPU machine, which
reaches no network: the wheels of the Python distributions our benchmark imports that its image lacks
(TransformerLens and its needs; torch, transformers and numpy are there), and a tokenizer whose vocabulary
fits both architectures (the installed SmolLM2's).

Which distributions: the ones ``benchmarks/bench_real_size.py`` imports (run here on ``--scale tiny``, read
from ``sys.modules``) less the image's list (``--present``, default the device tool's KINDS.md). Wheels for
CPython 3.12 (``--python-version``) on manylinux x86-64, ``--no-deps``, at the versions installed here.

Usage (here, in the repository root, with the venv active)::

    python scripts/prepare_gpu_carry.py                 # then: device run "bash scripts/gpu_evidence.sh", carry [".gpu"]
    python scripts/prepare_gpu_carry.py --list-only     # print what would be carried
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = Path("/work/.library/device/KINDS.md")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64", "manylinux_2_39_x86_64")
LIMIT_BYTES = 60 * 1024 ** 2
"""What may travel: the device tool carries 64 MiB with the working tree."""


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def present_on_device(kinds: Path) -> set[str]:
    """The distributions the GPU image holds, from KINDS.md's "Packages:" line."""
    text = kinds.read_text()
    match = re.search(r"Packages: (.+?)\.\n", text)
    if match is None:
        raise ValueError(f"no 'Packages:' line in {kinds}; pass --present with the image's package names")
    return {normalized(name) for name in match.group(1).split(", ")}


def imported_distributions() -> set[str]:
    """Distributions whose modules a tiny run of the real-size benchmark imports (in a fresh process)."""
    code = ("import sys, runpy; sys.argv = ['bench', '--scale', 'tiny', '--arch', 'llama-3-8b', '--pairs', '2', "
            "'--fit-pairs', '2', '--repeats', '1', '--new-tokens', '2', '--batches', '1', '--device', 'cpu']; "
            "runpy.run_path('benchmarks/bench_real_size.py', run_name='__main__'); "
            "print('MODULES', ' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    output = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    modules = output.split("MODULES ", 1)[1].split()
    mapping = importlib.metadata.packages_distributions()
    return {normalized(dist) for module in modules for dist in mapping.get(module, [])} - {"dpn-lens"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--present", help="comma-separated distributions the GPU image holds (default: KINDS.md)")
    parser.add_argument("--list-only", action="store_true")
    parser.add_argument("--python-version", default="3.12", help="the GPU image's Python (KINDS.md: 3.12)")
    args = parser.parse_args(argv)
    present = ({normalized(n) for n in args.present.split(",")} if args.present else present_on_device(KINDS))
    missing = sorted(imported_distributions() - present)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in missing]
    print("to carry:", " ".join(pins))
    if args.list_only:
        return
    carry = ROOT / ".gpu"
    shutil.rmtree(carry, ignore_errors=True)
    (carry / "whl").mkdir(parents=True)
    platforms = [option for platform in PLATFORMS for option in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", args.python_version, "--implementation", "cp", *platforms, "-d", str(carry / "whl"), *pins],
                   check=True)
    from dpn_lens.models import model_source

    tokenizer = carry / "tokenizer"
    tokenizer.mkdir()
    source = Path(model_source("smollm2-135m-instruct"))
    for file in source.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(file, tokenizer / file.name)
    size = sum(file.stat().st_size for file in carry.rglob("*") if file.is_file())
    print(f"{carry}: {len(list((carry / 'whl').iterdir()))} wheels and a tokenizer, {size / 1024 ** 2:.1f} MiB")
    if size > LIMIT_BYTES:
        raise SystemExit(f"{size / 1024 ** 2:.1f} MiB is over the {LIMIT_BYTES / 1024 ** 2:.0f} MiB the device tool "
                         "carries; drop a wheel the benchmark does not need")


if __name__ == "__main__":
    main()
