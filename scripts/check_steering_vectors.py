"""Check the steering-vectors export against the REAL steering-vectors library, on SmolLM2-135M-Instruct.

    python scripts/check_steering_vectors.py [--work DIR] [--venv DIR] [--map MAP] [--gamma 4]

Claim: the file written by ``dpn-lens export --format steering-vectors``, loaded with dpn-lens's
``load_steering_vector`` and applied with the library's own ``SteeringVector.apply`` (all positions),
gives the logits of dpn-lens's hook edit (``steering_intervention(map, gamma, direction,
positions="all")`` inside ``steer``) on the same model and token ids.

steering-vectors 0.12 pins ``transformers<5`` and dpn-lens needs transformers 5, so the library runs in
its own virtual environment (default ``$DPN_LENS_CACHE/runtimes/steering-vectors``, built here once with
``pip install torch==<this torch> steering-vectors``). Steps:

1. dpn-lens side (this interpreter): make a small openness map (``locate``, layers 1-29) unless
   ``--map`` is given, export it (``WORK/sv.safetensors``), check each exported vector equals
   ``down_proj.weight[l] @ delta_l``, and compute unsteered and steered logits (float32) for a few
   fixed prompts; the token ids go to ``WORK/tokens.json`` so both sides run the same ids.
2. steering-vectors side (the venv's interpreter, ``WORK/steering_vectors_side.py``, written from
   ``CHILD_SOURCE`` below): load the vector with dpn-lens's ``load_steering_vector`` (its source, taken
   from ``dpn_lens/export.py``; importing dpn_lens needs transformers 5), load the converted model
   folder that ``dpn_lens.load_model`` wrote, and compute the same logits with ``vector.apply(model)``.
   Two workarounds are needed to read that folder with transformers 4: its ``config.json`` has the
   transformers-5 layout (``rope_parameters``), which transformers 4 silently ignores (it would use
   rope_theta 10000), so a copy with ``rope_theta`` is written; and ``model.safetensors`` stores the
   tied embedding once, as ``lm_head.weight``, so the weights are loaded strictly by hand.
3. compare: max |logit difference| of the unsteered logits, the steered logits and the shift
   (steered - unsteered). PASS when all three are below 1e-3.

Why 1e-3: float32 rounding across two transformers versions is about 1e-5 on logits of size ~30
(3.3e-5 measured), while a wrong export is far larger: one layer off gives ~0.9, a flipped sign ~2,
a 10% scale error ~0.1 (measured with this model and map by shifting, negating and scaling the
library's vector).

Exit codes: 0 PASS, 1 FAIL (or an error), 77 SKIP (the venv cannot be built: offline, no wheel); a
skip prints one line ``SKIP: <reason>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The skip protocol, the runtime venv and the dpn-lens side, shared with the other runtime check.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_check import MODEL, SKIP_EXIT, Skip, export, make_map, runtime_venv, venv_python  # noqa: E402

TOLERANCE = 1e-3          # on logits (see the docstring)
EXPORT_TOLERANCE = 1e-5   # on the exported vectors (entries up to ~1.3 at gamma 4; the same float32 product)
MIN_SHIFT = 0.1           # the edit must move the logits by this much, else agreeing proves nothing
CONVERTED_GLOB = "SmolLM2-135M-Instruct*"
PROMPTS = ["I spent the weekend", "What do you think about modern art?", "My favourite way to travel is",
           "The meeting tomorrow will", "Tell me about a new idea you had recently."]

CHILD_SOURCE = r'''
"""steering-vectors side of scripts/check_steering_vectors.py (run in a transformers<5 venv).

    python steering_vectors_side.py CONVERTED EXPORT_PY VECTOR TOKENS_JSON OUT

Writes OUT (safetensors): ``unsteered.<i>`` and ``steered.<i>`` logits, float32, one per prompt.
"""
import __future__
import ast
import json
import os
import sys
from pathlib import Path
from typing import Any

import steering_vectors
import torch
import transformers
from safetensors.torch import load_file, save_file
from steering_vectors import SteeringVector
from transformers import AutoConfig, AutoModelForCausalLM


def dpn_lens_loader(export_py: Path):
    """dpn-lens's own ``load_steering_vector``, compiled from its source (dpn_lens needs transformers 5)."""
    tree = ast.parse(export_py.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "load_steering_vector")
    code = compile(ast.Module([node], []), f"{export_py}:load_steering_vector", "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    namespace = {"os": os, "Any": Any, "Path": Path}
    exec(code, namespace)
    return namespace["load_steering_vector"]


def transformers4_config(converted: Path, folder: Path):
    """The converted folder's config, rewritten for transformers 4.

    ``rope_parameters`` (transformers 5) is ignored by 4.x, which then silently uses rope_theta 10000.
    """
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama", config["model_type"]
    rope = config.pop("rope_parameters", None)
    if rope is not None:
        assert rope.get("rope_type", "default") == "default", rope
        config["rope_theta"] = rope["rope_theta"]
        config["rope_scaling"] = None
    config["architectures"] = ["LlamaForCausalLM"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    loaded = AutoConfig.from_pretrained(folder)
    assert rope is None or loaded.rope_theta == rope["rope_theta"], loaded.rope_theta
    return loaded


def load_model(converted: Path, config):
    """The model built from ``config``, with model.safetensors loaded strictly (float32, CPU).

    The file stores the tied embedding once, as ``lm_head.weight``; transformers 4's from_pretrained
    would leave ``model.embed_tokens.weight`` on the meta device, so the tensors are loaded here.
    """
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    state = load_file(str(converted / "model.safetensors"))
    state.setdefault("model.embed_tokens.weight", state["lm_head.weight"])
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    return model.eval()


def main(converted: str, export_py: str, vector_path: str, tokens_json: str, out: str) -> None:
    converted, out = Path(converted), Path(out)
    print(f"torch {torch.__version__} | transformers {transformers.__version__} | "
          f"steering-vectors {getattr(steering_vectors, '__version__', '?')}")
    vector = dpn_lens_loader(Path(export_py))(vector_path)
    assert isinstance(vector, SteeringVector), type(vector)
    model = load_model(converted, transformers4_config(converted, out.parent / "model_tf4"))
    print(f"{type(vector).__name__} layer_type={vector.layer_type} layers={sorted(vector.layer_activations)} "
          f"| rope_theta {model.config.rope_theta}")
    logits = {}
    with torch.no_grad():
        for i, row in enumerate(json.loads(Path(tokens_json).read_text())["ids"]):
            tokens = torch.tensor([row], dtype=torch.long)
            logits[f"unsteered.{i}"] = model(tokens).logits[0].float().contiguous()
            with vector.apply(model):                      # min_token_index=0: every position
                logits[f"steered.{i}"] = model(tokens).logits[0].float().contiguous()
            assert torch.equal(model(tokens).logits[0], logits[f"unsteered.{i}"]), "apply left a hook behind"
    save_file(logits, str(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
'''


def child_env() -> dict[str, str]:
    """This environment without what would point another interpreter at this venv's packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def venv_works(venv: Path) -> bool:
    if not venv_python(venv).exists():
        return False
    probe = subprocess.run([str(venv_python(venv)), "-c", "import steering_vectors, transformers, torch"],
                           capture_output=True, text=True, env=child_env())
    return probe.returncode == 0


def _first_error(output: str) -> str:
    """pip's first ``ERROR:`` line (the cause; later ones are summaries), else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return errors[0] if errors else (lines or ["no output"])[-1]


def ensure_venv(venv: Path) -> Path:
    """The steering-vectors venv's python: found, or built (``torch==<this torch>`` + ``steering-vectors``)."""
    import torch
    from filelock import FileLock

    if venv_works(venv):
        return venv_python(venv)
    if venv.exists() and any(venv.iterdir()) and not (venv / "pyvenv.cfg").exists():
        raise SystemExit(f"{venv} exists and is not a virtual environment; pass another --venv")
    venv.parent.mkdir(parents=True, exist_ok=True)
    torch_pin = "torch==" + torch.__version__.split("+")[0]    # "2.13.0+cpu" -> any 2.13.0 build
    with FileLock(str(venv) + ".lock"):                        # one builder at a time (parallel CI jobs)
        if venv_works(venv):
            return venv_python(venv)
        print(f"building {venv} ({torch_pin} steering-vectors; about 1.5 min, once)", flush=True)
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(venv_python(venv)), "-m", "pip", "install", "--quiet", torch_pin, "steering-vectors"]]
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True, env=child_env())
            if result.returncode != 0:
                raise Skip(f"cannot build the steering-vectors venv ({' '.join(step[1:4])} ...): "
                           f"{_first_error(result.stderr + result.stdout)}")
        if not venv_works(venv):
            raise Skip(f"the venv {venv} was built but cannot import steering_vectors")
    return venv_python(venv)


def export_vector(map_path: Path, gamma: float, out: Path) -> Path:
    return export(map_path, gamma, "steering-vectors", out)


def converted_folder(hf_model) -> Path:
    """The folder ``dpn_lens.load_model`` converted SmolLM2's GGUF into (in ``cache_dir()/converted``)."""
    from dpn_lens.models import cache_dir

    found = [path for path in sorted((cache_dir() / "converted").glob(CONVERTED_GLOB))
             if (path / "config.json").is_file() and (path / "model.safetensors").is_file()]
    loaded_from = Path(getattr(hf_model, "name_or_path", "") or ".").resolve()
    if loaded_from in [path.resolve() for path in found]:
        return loaded_from
    if len(found) != 1:
        raise SystemExit(f"expected one converted {CONVERTED_GLOB} folder in {cache_dir() / 'converted'}, "
                         f"found {[path.name for path in found]}")
    return found[0]


def export_difference(hf_model, edit, vector_path: Path) -> tuple[list[int], float]:
    """Exported layers and max |file - down_proj.weight[l] @ delta_l| (independent of dpn_lens.export)."""
    from safetensors import safe_open

    with safe_open(str(vector_path), "pt") as handle:
        exported = {int(key.split(".")[1]): handle.get_tensor(key) for key in handle.keys()}
    expected = {layer: hf_model.model.layers[layer].mlp.down_proj.weight.detach().float() @ delta.float()
                for layer, delta in edit.deltas.items() if bool((delta != 0).any())}
    if sorted(exported) != sorted(expected):
        return sorted(exported), float("inf")
    return sorted(exported), max(float((exported[l] - expected[l]).abs().max()) for l in expected)


def dpn_lens_logits(model, edit, ids: list[list[int]]) -> dict:
    """Unsteered and steered logits (float32) of dpn-lens's hook edit, one tensor per prompt."""
    import torch

    import dpn_lens as dl

    logits = {}
    with torch.no_grad():
        for i, row in enumerate(ids):
            tokens = torch.tensor([row], dtype=torch.long)
            logits[f"unsteered.{i}"] = model(tokens)[0].float()
            with dl.steer(model, edit):
                logits[f"steered.{i}"] = model(tokens)[0].float()
            assert torch.equal(model(tokens)[0].float(), logits[f"unsteered.{i}"]), "steer left a hook behind"
    return logits


def steering_vectors_logits(python: Path, work: Path, converted: Path, vector_path: Path, tokens: Path) -> dict:
    """The child script's logits (the real library, transformers 4)."""
    import dpn_lens.export
    from safetensors.torch import load_file

    script, out = work / "steering_vectors_side.py", work / "sv_logits.safetensors"
    script.write_text(CHILD_SOURCE.lstrip())
    result = subprocess.run([str(python), str(script), str(converted), dpn_lens.export.__file__, str(vector_path),
                             str(tokens), str(out)], capture_output=True, text=True, env=child_env())
    if result.returncode != 0:
        raise SystemExit(f"the steering-vectors side failed (exit {result.returncode}):\n"
                         f"{result.stdout}\n{result.stderr}")
    print("steering-vectors side:", result.stdout.strip().replace("\n", "\n  "))
    return load_file(str(out))


def compare(dpn: dict, sv: dict, ids: list[list[int]]) -> dict[str, float]:
    """Print the table of max |logit differences| per prompt; return the worst of each column.

    ``shift size`` is dpn-lens's own max |steered - unsteered|, the smallest over the prompts.
    """
    print("\n| prompt | tokens | unsteered | steered | shift | shift size (dpn-lens) |")
    print("|---|---|---|---|---|---|")
    worst = {"unsteered": 0.0, "steered": 0.0, "shift": 0.0, "shift size": float("inf")}
    for i, row in enumerate(ids):
        u_d, s_d, u_s, s_s = dpn[f"unsteered.{i}"], dpn[f"steered.{i}"], sv[f"unsteered.{i}"], sv[f"steered.{i}"]
        diffs = {"unsteered": float((u_d - u_s).abs().max()), "steered": float((s_d - s_s).abs().max()),
                 "shift": float(((s_d - u_d) - (s_s - u_s)).abs().max())}
        size = float((s_d - u_d).abs().max())
        worst = {**{key: max(worst[key], value) for key, value in diffs.items()},
                 "shift size": min(worst["shift size"], size)}
        print(f"| {i} | {len(row)} | {diffs['unsteered']:.2e} | {diffs['steered']:.2e} | {diffs['shift']:.2e} "
              f"| {size:.3f} |")
    print(f"| worst | | {worst['unsteered']:.2e} | {worst['steered']:.2e} | {worst['shift']:.2e} "
          f"| {worst['shift size']:.3f} |\n")
    return worst


def check(work: Path, venv: Path, map_path: Path | None, gamma: float) -> list[str]:
    """Run both sides and compare; returns what failed (empty: PASS)."""
    import dpn_lens as dl

    python = ensure_venv(venv)
    work.mkdir(parents=True, exist_ok=True)
    map_path = map_path or make_map(work)
    vector_path = export_vector(map_path, gamma, work / "sv.safetensors")
    model = dl.load_model(MODEL)                          # float32
    hf_model = model.original_model
    edit = dl.steering_intervention(dl.NeuronMap.load(map_path, model=model), gamma, "increase", positions="all")
    print(f"edit: {edit.label}, {edit.n_edited} neurons")
    layers, export_diff = export_difference(hf_model, edit, vector_path)
    print(f"export: layers {layers}, max |file - down_proj.weight @ delta| = {export_diff:.2e}")
    ids = [model.tokenizer(prompt, add_special_tokens=True)["input_ids"] for prompt in PROMPTS]
    tokens = work / "tokens.json"
    tokens.write_text(json.dumps({"prompts": PROMPTS, "ids": ids}))
    dpn = dpn_lens_logits(model, edit, ids)
    sv = steering_vectors_logits(python, work, converted_folder(hf_model), vector_path, tokens)
    worst = compare(dpn, sv, ids)
    failures = [f"max |{key} difference| {worst[key]:.2e} >= {TOLERANCE:g}"
                for key in ("unsteered", "steered", "shift") if not worst[key] < TOLERANCE]
    if not export_diff < EXPORT_TOLERANCE:
        failures.append(f"exported vectors differ from down_proj.weight @ delta by {export_diff:.2e} "
                        f"(layers {layers})")
    if not worst["shift size"] >= MIN_SHIFT:
        failures.append(f"the edit moves the logits by only {worst['shift size']:.3f} < {MIN_SHIFT:g}: "
                        "agreement would prove nothing (raise --gamma or use another map)")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="working folder (None: a new temporary one)")
    parser.add_argument("--venv", type=Path, default=None,
                        help="steering-vectors venv, built there if missing "
                             "(None: $DPN_LENS_CACHE/runtimes/steering-vectors)")
    parser.add_argument("--map", type=Path, default=None, help="neuron map (None: a small openness map, made here)")
    parser.add_argument("--gamma", type=float, default=4.0, help="steering strength of the exported edit")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="check_steering_vectors-"))
    start = time.time()
    try:
        failures = check(work, args.venv or runtime_venv("steering-vectors"), args.map, args.gamma)
    except Skip as reason:
        print(f"SKIP: {reason}")
        return SKIP_EXIT
    took = f"{time.time() - start:.0f} s, work folder {work}"
    if failures:
        print("FAIL: " + "; ".join(failures) + f" ({took})")
        return 1
    print(f"PASS: all max |logit differences| < {TOLERANCE:g}, exported vectors = down_proj.weight @ delta "
          f"(within {EXPORT_TOLERANCE:g}) ({took})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
