"""Check the GGUF control-vector export against a REAL llama.cpp, on SmolLM2-135M-Instruct.

    python scripts/check_llama_cpp.py [--work DIR] [--venv DIR] [--map MAP]

Claim: the file written by ``dpn-lens export --format gguf``, loaded and applied the way llama.cpp's
``--control-vector FILE`` does it, moves llama.cpp's next-token log-probs as dpn-lens's own hook edit
(``steering_intervention(map, gamma, "increase", positions="all")`` inside ``steer``) moves dpn-lens's,
on the same weights and the same token ids.

llama.cpp comes from the PyPI wheel ``llama-cpp-py-sync`` (prebuilt ``libllama.so`` of llama.cpp b11739
with CFFI bindings; no CLI binaries), installed in its own virtual environment (default
``$DPN_LENS_CACHE/runtimes/llama-cpp``, built here once). Steps:

1. runtime: build or reuse the venv and load the library. The wheel needs glibc >= 2.38 for four C23
   functions (``__isoc23_strtol``/``strtoul``/``strtoull``/``sscanf``); only when loading fails with a
   GLIBC_2.38 error and gcc is available, ``scripts/isoc23_shim.c`` is compiled and preloaded and the
   libraries' GLIBC_2.38 version need is marked weak (see ``apply_glibc_workaround``).
2. dpn-lens side (this interpreter): make a small openness map (``locate``, layers 1-29: a control vector
   cannot steer layer 0) unless ``--map`` is given, export it with ``dpn-lens export --format gguf`` at
   gamma 4 and 1, and compute unsteered and steered log-probs (float32 model, float64 softmax) at every
   position of a few fixed prompts. The token ids go to ``WORK/tokens.json``: dpn-lens's tokenizer adds a
   BOS token and llama.cpp's does not for this model, so both sides are fed the same ids.
3. llama.cpp side (the venv's interpreter, ``WORK/llama_cpp_side.py``, written from ``CHILD_SOURCE``):
   load the model, read each control vector with llama.cpp's OWN GGUF reader (``gguf_init_from_file`` in
   the shipped libggml-base, via ctypes) following ``common_control_vector_load_one`` line by line, apply
   it with ``llama_set_adapter_cvec(ctx, data, len, n_embd, 1, n_layer)`` as ``common_init_from_params``
   does for ``--control-vector``, and return the logits of every position.
4. compare the shifts (steered - unsteered log-probs) of the two sides.

The model is an F32 GGUF written here (``WORK/SmolLM2-135M-Instruct.F32.gguf``, about 540 MB) from the
embedded Q4_1 GGUF with gguf-py: same metadata, every tensor dequantised, i.e. exactly the weights that
dpn-lens dequantises too. With the Q4_1 file llama.cpp also quantises activations (Q8_1) inside its
matmuls, which moves the log-probs by 0.2-0.35 for ANY non-zero control vector (measured with a gamma-1
vector times 1e-3), far more than the gamma-1 shift itself; on Q4_1 only a weak check would be possible.

PASS when, at gamma 4 (top-20: the union of the 20 most likely next tokens of the four distributions, at
the last position; pooled: all positions x the full vocabulary):

* pooled correlation of the two shifts >= 0.99 (measured 0.9997);
* per prompt, top-20 relative error ||shift_dpn - shift_llama|| / ||shift_dpn|| <= 0.1 (measured <= 0.039);
* top-20 max |shift_dpn - shift_llama| <= 0.05 (measured 0.014; the shifts themselves reach ~0.27);
* unsteered KL(dpn-lens || llama.cpp) <= 1e-3 at every position (measured <= 2e-5; the Q4_1 file gives
  up to 2e-2), so both sides run the same weights;
* the same gamma-4 vectors applied one layer late do NOT pass the correlation bar (measured 0.52): the
  check can tell a misplaced vector.

(Measured with the default map of this script and llama.cpp's default context settings: f16 KV cache,
flash attention "auto", i.e. on for the CPU; with flash attention off the gamma-4 numbers are 0.034 and 0.011.)

Why these tolerances: float32 rounding in two implementations and llama.cpp's f16 KV cache put about 1e-2
of noise on log-prob shifts, while a vector one layer early or late drops the pooled correlation to
0.34-0.53 and gives top-20 relative errors of 0.4-1.2. Gamma 1 is reported, not checked: its shifts
(~0.07) are small enough that the same ~1e-2 noise is a 10-20% relative error (measured pooled
correlation 0.991, top-20 relative error up to 0.18).

Exit codes: 0 PASS, 1 FAIL (or an error), 77 SKIP (llama.cpp cannot be installed or loaded here: pip
fails, glibc too old and no gcc, ...); a skip prints one line ``SKIP: <reason>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# The skip protocol, the runtime venv and the dpn-lens side, shared with the other runtime check.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_check import MODEL, SKIP_EXIT, Skip, export, make_map, runtime_venv, venv_python  # noqa: E402

LLAMA_CPP_PACKAGE = "llama-cpp-py-sync==0.11739"
GAMMA, REPORTED_GAMMA = 4.0, 1.0
TOP_K = 20
MIN_POOLED_CORRELATION = 0.99
MAX_TOP_K_RELATIVE_ERROR = 0.1
MAX_TOP_K_SHIFT_DIFFERENCE = 0.05
MAX_UNSTEERED_KL = 1e-3
PROMPTS = ["I think that trying new things is", "My favourite way to spend a weekend is",
           "When I visit a new city, I usually", "Art and poetry are",
           {"chat": "Describe yourself in one sentence."}]
SHIM_SOURCE = Path(__file__).with_name("isoc23_shim.c")
SHIM_SYMBOLS = ("__isoc23_strtol", "__isoc23_strtoul", "__isoc23_strtoull", "__isoc23_sscanf")

CHILD_SOURCE = r'''
"""llama.cpp side of scripts/check_llama_cpp.py (run in the llama-cpp-py-sync venv).

    python llama_cpp_side.py MODEL TOKENS_JSON OUT NAME=CVEC[@SHIFT] ...

Writes OUT (.npz): ``<condition>.<prompt>`` float32 logits [positions, vocab] for condition ``base`` (no
control vector) and each NAME (the control vector CVEC, its layers moved by SHIFT when given).
"""
import ctypes
import json
import os
import sys

import numpy as np
import llama_cpp_py_sync
from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib

GGML_TYPE_F32 = 0
GGML_LOG_LEVEL_ERROR = 4
lib, ffi = get_lib(), get_ffi()


@ffi.callback("void(enum ggml_log_level, const char *, void *)")
def errors_only(level, text, _user_data):
    if level == GGML_LOG_LEVEL_ERROR:
        sys.stderr.write(ffi.string(text).decode(errors="replace"))


lib.llama_log_set(errors_only, ffi.NULL)     # llama.cpp logs thousands of lines per context otherwise


class GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def ggml_base():
    """llama.cpp's GGUF reader, from the libggml-base shipped with (and already loaded by) libllama."""
    gg = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp_py_sync.__file__), "libggml-base.so.0"))
    signatures = {"gguf_init_from_file": (ctypes.c_void_p, [ctypes.c_char_p, GgufInitParams]),
                  "gguf_get_n_tensors": (ctypes.c_int64, [ctypes.c_void_p]),
                  "gguf_get_tensor_name": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
                  "ggml_get_tensor": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
                  "ggml_n_dims": (ctypes.c_int, [ctypes.c_void_p]),
                  "ggml_nelements": (ctypes.c_int64, [ctypes.c_void_p]),
                  "ggml_get_data_f32": (ctypes.POINTER(ctypes.c_float), [ctypes.c_void_p]),
                  "gguf_free": (None, [ctypes.c_void_p]), "ggml_free": (None, [ctypes.c_void_p])}
    for name, (restype, argtypes) in signatures.items():
        getattr(gg, name).restype, getattr(gg, name).argtypes = restype, argtypes
    return gg


def load_control_vector(gg, fname):
    """Port of llama.cpp's common_control_vector_load_one (strength 1): (n_embd, data), layer 1 at data[0]."""
    gctx = ctypes.c_void_p()
    handle = gg.gguf_init_from_file(fname.encode(), GgufInitParams(False, ctypes.pointer(gctx)))
    if not handle:
        raise RuntimeError(f"failed to load control vector file from {fname}")
    n_embd, data = -1, np.zeros(0, np.float32)
    try:
        for i in range(gg.gguf_get_n_tensors(handle)):
            name = gg.gguf_get_tensor_name(handle, i).decode()
            prefix, dot, rest = name.partition(".")
            layer_idx = int(rest) if prefix == "direction" and dot and rest.isdigit() else -1
            if layer_idx < 0:
                raise RuntimeError(f"invalid/unparsable direction tensor layer index in {fname}: {name}")
            if layer_idx == 0:
                raise RuntimeError(f"invalid (zero) direction tensor layer index in {fname}")
            tensor = gg.ggml_get_tensor(gctx, name.encode())
            if ctypes.cast(tensor, ctypes.POINTER(ctypes.c_int)).contents.value != GGML_TYPE_F32:
                raise RuntimeError(f"invalid (non-F32) direction tensor type in {fname}")
            if gg.ggml_n_dims(tensor) != 1:
                raise RuntimeError(f"invalid (non-1D) direction tensor shape in {fname}")
            if n_embd == -1:
                n_embd = gg.ggml_nelements(tensor)
            elif gg.ggml_nelements(tensor) != n_embd:
                raise RuntimeError(f"direction tensor in {fname} does not match previous dimensions")
            if data.size < n_embd * layer_idx:                      # data.resize(n_embd * layer_idx, 0)
                data = np.concatenate([data, np.zeros(n_embd * layer_idx - data.size, np.float32)])
            row = np.ctypeslib.as_array(gg.ggml_get_data_f32(tensor), shape=(n_embd,))
            data[n_embd * (layer_idx - 1): n_embd * layer_idx] += row  # x strength (1)
    finally:
        gg.gguf_free(handle)
        gg.ggml_free(gctx)
    if n_embd == -1:
        raise RuntimeError(f"no direction tensors found in {fname}")
    return n_embd, data


def shifted(data, n_embd, shift):
    """The control vector with every layer's row moved ``shift`` layers later (a negative control)."""
    rows = data.reshape(-1, n_embd)
    out = np.zeros((rows.shape[0] + max(shift, 0), n_embd), np.float32)
    for k, row in enumerate(rows):
        if 0 <= k + shift < out.shape[0]:
            out[k + shift] = row
    return out.ravel()


def new_context(model):
    params = lib.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 512
    params.n_threads = params.n_threads_batch = 1
    context = lib.llama_init_from_model(model, params)
    assert context != ffi.NULL, "llama_init_from_model failed"
    return context


def logits(context, ids, n_vocab):
    """float32 logits at every position of one sequence (one batch, memory cleared first)."""
    lib.llama_memory_clear(lib.llama_get_memory(context), True)
    batch = lib.llama_batch_init(len(ids), 0, 1)
    try:
        batch.n_tokens = len(ids)
        for i, token in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
            batch.seq_id[i][0] = 0
        status = lib.llama_decode(context, batch)
        assert status == 0, f"llama_decode returned {status}"
    finally:
        lib.llama_batch_free(batch)
    return np.stack([np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(context, i), 4 * n_vocab), np.float32)
                     for i in range(len(ids))])


def main(model_path, tokens_json, out, *specs):
    ids = json.load(open(tokens_json))["ids"]
    lib.llama_backend_init()
    model_params = lib.llama_model_default_params()
    model_params.n_gpu_layers = 0
    model = lib.llama_model_load_from_file(model_path.encode(), model_params)
    assert model != ffi.NULL, f"llama.cpp cannot load {model_path}"
    vocab = lib.llama_model_get_vocab(model)
    n_vocab, n_layer = lib.llama_vocab_n_tokens(vocab), lib.llama_model_n_layer(model)
    n_embd = lib.llama_model_n_embd(model)
    print(f"llama.cpp {llama_cpp_py_sync.__llama_cpp_tag__} ({llama_cpp_py_sync.__llama_cpp_commit__}) | "
          f"n_layer {n_layer} n_embd {n_embd} n_vocab {n_vocab} | tokenizer adds BOS: "
          f"{bool(lib.llama_vocab_get_add_bos(vocab))} (fed dpn-lens's ids either way)")
    gg, result = ggml_base(), {}
    for spec in ("base", *specs):
        name, _, source = spec.partition("=")
        context = new_context(model)
        if source:
            path, _, shift = source.partition("@")
            vector_embd, data = load_control_vector(gg, path)
            assert vector_embd == n_embd, (vector_embd, n_embd)
            if shift:
                data = shifted(data, n_embd, int(shift))
            status = lib.llama_set_adapter_cvec(context, ffi.cast("float *", ffi.from_buffer(data)), data.size,
                                                n_embd, 1, n_layer)
            assert status == 0, f"llama_set_adapter_cvec returned {status} for {spec}"
            layers = [k + 1 for k, row in enumerate(data.reshape(-1, n_embd)) if row.any()]
            print(f"{name}: control vector on layers {layers}")
        for i, row in enumerate(ids):
            result[f"{name}.{i}"] = logits(context, row, n_vocab)
        lib.llama_free(context)
    lib.llama_model_free(model)
    np.savez(out, **result)


if __name__ == "__main__":
    main(*sys.argv[1:])
'''


# ---- the llama.cpp runtime --------------------------------------------------------------------------

def shim_library(venv: Path) -> Path:
    return venv / "glibc-shim" / "libisoc23shim.so"


def child_env(venv: Path) -> dict[str, str]:
    """This environment without what points another interpreter at this venv, plus the glibc shim if built."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    if shim_library(venv).is_file():
        env["LD_PRELOAD"] = " ".join(filter(None, [str(shim_library(venv)), env.get("LD_PRELOAD")]))
        env["LD_BIND_NOW"] = "1"          # a symbol the shim lacks fails at load, not mid-run
    return env


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("ERROR", "RuntimeError", "OSError"))]
    return (errors or lines or ["no output"])[-1]


def load_error(venv: Path) -> str | None:
    """None when the venv's interpreter loads libllama (and the libggml-base it links), else the error."""
    if not venv_python(venv).exists():
        return f"{venv_python(venv)} does not exist"
    probe = ("import llama_cpp_py_sync; from llama_cpp_py_sync._cffi_bindings import get_lib; "
             "get_lib().llama_backend_init()")
    result = subprocess.run([str(venv_python(venv)), "-c", probe], capture_output=True, text=True,
                            env=child_env(venv))
    return None if result.returncode == 0 else _last_line(result.stderr + result.stdout)


def package_libraries(venv: Path) -> list[Path]:
    found = sorted(venv.glob("lib/python*/site-packages/llama_cpp_py_sync/lib*.so*"))
    return [path for path in found if path.is_file() and not path.is_symlink()]


def weaken_version_need(path: Path, version: str = "GLIBC_2.38") -> int:
    """Mark ``version`` in the ELF64 file's version-needs table (.gnu.version_r) VER_FLG_WEAK, in place.

    glibc's loader then no longer refuses the library because the version is missing; the symbols
    themselves must come from elsewhere (the preloaded shim). Returns how many entries were marked.
    """
    data = bytearray(path.read_bytes())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise Skip(f"{path.name} is not a little-endian ELF64 file; cannot apply the glibc workaround")
    section_offset, = struct.unpack_from("<Q", data, 0x28)
    entry_size, n_sections = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size) for i in range(n_sections)]
    marked = 0
    for _name, kind, _flags, _addr, offset, _size, link, *_rest in sections:
        if kind != 0x6FFFFFFE:                                          # SHT_GNU_verneed
            continue
        strings, need = sections[link][4], offset
        while True:
            _version, n_aux, _file, aux_offset, next_need = struct.unpack_from("<HHIII", data, need)
            aux = need + aux_offset
            for _ in range(n_aux):
                _hash, flags, _other, name, next_aux = struct.unpack_from("<IHHII", data, aux)
                if data[strings + name: data.index(0, strings + name)].decode() == version:
                    struct.pack_into("<H", data, aux + 4, flags | 0x2)  # VER_FLG_WEAK
                    marked += 1
                aux += next_aux
            if not next_need:
                break
            need += next_need
    if marked:
        path.write_bytes(bytes(data))
    return marked


def apply_glibc_workaround(venv: Path) -> None:
    """Compile and install the isoc23 shim, and weaken the libraries' GLIBC_2.38 need (glibc < 2.38 only)."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise Skip("llama-cpp-py-sync's libllama needs glibc >= 2.38 and no gcc is available to build the shim")
    library = shim_library(venv)
    library.parent.mkdir(parents=True, exist_ok=True)
    version_script = library.with_suffix(".map")
    version_script.write_text(f"GLIBC_2.38 {{ global: {'; '.join(SHIM_SYMBOLS)}; local: *; }};\n")
    command = [compiler, "-shared", "-fPIC", "-O2", f"-Wl,--version-script={version_script}",
               "-o", str(library), str(SHIM_SOURCE)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        library.unlink(missing_ok=True)
        raise Skip(f"cannot compile the glibc 2.38 shim: {_last_line(result.stderr)}")
    weakened = {path.name: weaken_version_need(path) for path in package_libraries(venv)}
    print(f"glibc workaround: built {library}, weakened GLIBC_2.38 in "
          f"{', '.join(name for name, n in weakened.items() if n) or 'no library'}")


def install(venv: Path) -> None:
    """Create the venv (if needed) and pip-install llama-cpp-py-sync into it."""
    print(f"building {venv} ({LLAMA_CPP_PACKAGE}; about 10 s, once)", flush=True)
    steps = [[str(venv_python(venv)), "-m", "pip", "install", "--quiet", LLAMA_CPP_PACKAGE, "numpy"]]
    if not venv_python(venv).exists():
        steps.insert(0, [sys.executable, "-m", "venv", str(venv)])
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, env=child_env(venv))
        if result.returncode != 0:
            raise Skip(f"cannot build the llama.cpp venv ({' '.join(step[1:5])} ...): "
                       f"{_last_line(result.stderr + result.stdout)}")


def ensure_runtime(venv: Path) -> Path:
    """The llama-cpp-py-sync venv's python, with a loadable libllama: found, or built here (~10 s, once)."""
    from filelock import FileLock

    if load_error(venv) is None:
        return venv_python(venv)
    if venv.exists() and any(venv.iterdir()) and not (venv / "pyvenv.cfg").exists():
        raise SystemExit(f"{venv} exists and is not a virtual environment; pass another --venv")
    venv.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(venv) + ".lock"):                        # one builder at a time (parallel CI jobs)
        error = load_error(venv)
        if error is not None and not shim_library(venv).exists() and "GLIBC_2.38" not in error:
            install(venv)
            error = load_error(venv)
        if error is not None and "GLIBC_2.38" in error and not shim_library(venv).exists():
            apply_glibc_workaround(venv)
            error = load_error(venv)
        if error is not None:
            raise Skip(f"llama.cpp's library does not load here: {error}")
    return venv_python(venv)


# ---- the dpn-lens side ------------------------------------------------------------------------------

def export_control_vector(map_path: Path, gamma: float, out: Path) -> Path:
    return export(map_path, gamma, "gguf", out)


def write_f32_gguf(source: Path, target: Path) -> Path:
    """An F32 copy of ``source``: same metadata, every tensor dequantised with gguf-py (written once)."""
    import gguf

    if target.exists():
        return target
    print(f"writing {target.name} (F32, ~540 MB) from {source.name}", flush=True)
    reader = gguf.GGUFReader(str(source))
    partial = target.with_name(target.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        if field.name == "general.file_type":
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values.reshape(tuple(int(n) for n in reversed(tensor.shape))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(target)
    return target


def token_ids(tokenizer) -> list[list[int]]:
    """dpn-lens's ids: plain prompts with the tokenizer's special tokens (BOS), the chat one templated."""
    ids = []
    for prompt in PROMPTS:
        if isinstance(prompt, dict):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt["chat"]}], tokenize=False,
                                                 add_generation_prompt=True)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids.append(tokenizer(prompt)["input_ids"])
    return ids


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def dpn_lens_logprobs(model, neuron_map, ids: list[list[int]], gammas: dict[str, float]) -> dict:
    """``{condition: [log-probs per prompt]}``: unsteered (``base``) and steered with each gamma."""
    import torch

    import dpn_lens as dl

    edits = {name: dl.steering_intervention(neuron_map, gamma, "increase", positions="all")
             for name, gamma in gammas.items()}
    result = {name: [] for name in ("base", *gammas)}
    with torch.no_grad():
        for row in ids:
            tokens = torch.tensor([row], dtype=torch.long)
            result["base"].append(log_softmax(model(tokens)[0].float().numpy()))
            for name, edit in edits.items():
                with dl.steer(model, edit):
                    result[name].append(log_softmax(model(tokens)[0].float().numpy()))
    return result


# ---- the llama.cpp side -----------------------------------------------------------------------------

def llama_cpp_logprobs(python: Path, venv: Path, work: Path, model_path: Path, tokens: Path,
                       vectors: dict[str, str]) -> dict:
    """``{condition: [log-probs per prompt]}`` from the child script (``base`` plus each of ``vectors``)."""
    script, out = work / "llama_cpp_side.py", work / "llama_cpp_logits.npz"
    script.write_text(CHILD_SOURCE.lstrip())
    specs = [f"{name}={source}" for name, source in vectors.items()]
    result = subprocess.run([str(python), str(script), str(model_path), str(tokens), str(out), *specs],
                            capture_output=True, text=True, env=child_env(venv))
    if result.returncode != 0:
        raise SystemExit(f"the llama.cpp side failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    print("llama.cpp side:", result.stdout.strip().replace("\n", "\n  "))
    with np.load(out) as logits:
        n_prompts = len(PROMPTS)
        return {name: [log_softmax(logits[f"{name}.{i}"]) for i in range(n_prompts)] for name in ("base", *vectors)}


# ---- comparison -------------------------------------------------------------------------------------

def top_k(values: np.ndarray) -> set[int]:
    return set(np.argsort(-values)[:TOP_K].tolist())


def kl(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row (natural log)."""
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def shift_agreement(dpn: dict, llama: dict, dpn_condition: str, llama_condition: str) -> dict:
    """Worst-over-prompts top-20 numbers at the last position, and the pooled correlation of the shifts."""
    rel, difference, size = [], [], []
    for db, ds, lb, ls in zip(dpn["base"], dpn[dpn_condition], llama["base"], llama[llama_condition]):
        db, ds, lb, ls = db[-1], ds[-1], lb[-1], ls[-1]
        tokens = sorted(top_k(db) | top_k(ds) | top_k(lb) | top_k(ls))
        shift_d, shift_l = (ds - db)[tokens], (ls - lb)[tokens]
        rel.append(np.linalg.norm(shift_d - shift_l) / np.linalg.norm(shift_d))
        difference.append(np.abs(shift_d - shift_l).max())
        size.append(np.abs(shift_d).max())
    pooled_d = np.concatenate([(s - b).ravel() for s, b in zip(dpn[dpn_condition], dpn["base"])])
    pooled_l = np.concatenate([(s - b).ravel() for s, b in zip(llama[llama_condition], llama["base"])])
    return {"corr": float(np.corrcoef(pooled_d, pooled_l)[0, 1]), "rel": float(max(rel)),
            "diff": float(max(difference)), "size": float(max(size))}


def compare(dpn: dict, llama: dict) -> bool:
    """Print the table; True when the gamma-4 criteria hold and the misplaced control fails them."""
    rows = {"gamma 4": shift_agreement(dpn, llama, "gamma4", "gamma4"),
            "gamma 1 (reported)": shift_agreement(dpn, llama, "gamma1", "gamma1"),
            "gamma 4, one layer late": shift_agreement(dpn, llama, "gamma4", "gamma4_late")}
    steered, control = rows["gamma 4"], rows["gamma 4, one layer late"]
    unsteered = np.concatenate([kl(d, l) for d, l in zip(dpn["base"], llama["base"])])
    checks = {
        f"pooled corr >= {MIN_POOLED_CORRELATION}": steered["corr"] >= MIN_POOLED_CORRELATION,
        f"top-20 rel <= {MAX_TOP_K_RELATIVE_ERROR}": steered["rel"] <= MAX_TOP_K_RELATIVE_ERROR,
        f"top-20 max |d shift| <= {MAX_TOP_K_SHIFT_DIFFERENCE}": steered["diff"] <= MAX_TOP_K_SHIFT_DIFFERENCE,
        f"unsteered KL <= {MAX_UNSTEERED_KL:g}": float(unsteered.max()) <= MAX_UNSTEERED_KL,
        f"one-layer-late control corr < {MIN_POOLED_CORRELATION}": control["corr"] < MIN_POOLED_CORRELATION,
    }
    print("\n| condition | pooled corr | worst top-20 rel | top-20 max abs(d shift) | top-20 max abs(shift) dpn-lens |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['corr']:.4f} | {row['rel']:.3f} | {row['diff']:.3f} | {row['size']:.3f} |")
    print(f"unsteered KL(dpn-lens || llama.cpp) over {unsteered.size} positions: "
          f"max {unsteered.max():.2e}, mean {unsteered.mean():.2e}")
    print("checks (gamma 4): " + "; ".join(f"{name}: {'ok' if ok else 'FAILED'}" for name, ok in checks.items()))
    return all(checks.values())


def check(work: Path, venv: Path, map_path: Path | None) -> bool:
    python = ensure_runtime(venv)                 # first: a skip should cost seconds, not a model load
    import dpn_lens as dl
    from dpn_lens.models import embedded_gguf_path

    work.mkdir(parents=True, exist_ok=True)
    map_path = map_path or make_map(work)
    vectors = {f"gamma{gamma:g}": export_control_vector(map_path, gamma, work / f"cvec_gamma{gamma:g}.gguf")
               for gamma in (GAMMA, REPORTED_GAMMA)}
    gguf_model = write_f32_gguf(embedded_gguf_path(MODEL), work / "SmolLM2-135M-Instruct.F32.gguf")
    model = dl.load_model(MODEL)                  # float32, dequantised from the same Q4_1 GGUF
    neuron_map = dl.NeuronMap.load(map_path, model=model)
    ids = token_ids(model.tokenizer)
    tokens = work / "tokens.json"
    tokens.write_text(json.dumps({"prompts": PROMPTS, "ids": ids}))
    dpn = dpn_lens_logprobs(model, neuron_map, ids, {"gamma4": GAMMA, "gamma1": REPORTED_GAMMA})
    llama = llama_cpp_logprobs(python, venv, work, gguf_model, tokens,
                               {"gamma4": str(vectors["gamma4"]), "gamma1": str(vectors["gamma1"]),
                                "gamma4_late": f"{vectors['gamma4']}@1"})
    return compare(dpn, llama)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="working folder (None: a new temporary one)")
    parser.add_argument("--venv", type=Path, default=None,
                        help="llama-cpp-py-sync venv, built if missing (None: $DPN_LENS_CACHE/runtimes/llama-cpp)")
    parser.add_argument("--map", type=Path, default=None, help="neuron map (None: a small openness map, made here)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="check_llama_cpp-"))
    start = time.time()
    try:
        passed = check(work, args.venv or runtime_venv("llama-cpp"), args.map)
    except Skip as reason:
        print(f"SKIP: {reason}")
        return SKIP_EXIT
    print(f"{'PASS' if passed else 'FAIL'} (F32 GGUF, gamma {GAMMA:g}; {time.time() - start:.0f} s, "
          f"work folder {work})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
