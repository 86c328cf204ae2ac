"""The NeuronMap artifact: exact round trips, refusal on other models, corruption, atomic saves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dpn_lens import ContrastiveSet, NeuronMap, collect_statistics, locate
from dpn_lens.collection.collect import CollectionConfig
from dpn_lens.localization.neuron_map import IncompatibleModelError
from helpers import build_tiny_model, random_prompts


def build_map(model, seed: int = 20) -> NeuronMap:
    pairs = ContrastiveSet("extraversion", random_prompts(seed, 12), random_prompts(seed + 1, 12), source="tests")
    stats = collect_statistics(model, pairs, CollectionConfig(max_batch_size=6, progress=False))
    return locate(stats, q=0.8, tau_d=0.2, layers=[1, 2, 3])


@pytest.fixture(scope="module")
def tiny_map(tiny_model) -> NeuronMap:
    neuron_map = build_map(tiny_model)
    assert neuron_map.n_selected("high") and neuron_map.n_selected("low")  # something to round-trip
    return neuron_map


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """Same architecture as the tiny model but d_mlp 64 instead of 48."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_wide"), d_mlp=64)


def assert_same_map(a: NeuronMap, b: NeuronMap) -> None:
    assert a.config() == b.config()
    assert torch.equal(a.steering_value, b.steering_value) and torch.equal(a.effect_size, b.effect_size)
    assert a.high.keys() == b.high.keys() and a.low.keys() == b.low.keys()
    for layer in a.layers:
        assert torch.equal(a.high[layer], b.high[layer]) and torch.equal(a.low[layer], b.low[layer])
    assert a.tau_q == b.tau_q and a.settings == b.settings


def test_saved_map_reloads_identically(tiny_model, tiny_map, tmp_path):
    path = tiny_map.save(tmp_path / "extraversion.safetensors")
    loaded = NeuronMap.load(path, model=tiny_model)
    assert_same_map(tiny_map, loaded)
    assert (tmp_path / "extraversion.json").exists()  # readable copy of the config beside it
    assert repr(loaded) == repr(tiny_map)


def test_loading_onto_a_model_with_other_weights_names_the_difference(tiny_map, other_tiny_model, tmp_path):
    path = tiny_map.save(tmp_path / "map.safetensors")
    with pytest.raises(IncompatibleModelError, match=r"different model \(weights: .*locate the trait on this model"):
        NeuronMap.load(path, model=other_tiny_model)


def test_loading_onto_a_model_with_another_d_mlp_names_the_difference(tiny_map, wide_model, tmp_path):
    path = tiny_map.save(tmp_path / "map.safetensors")
    with pytest.raises(IncompatibleModelError, match=r"d_mlp: 48 vs 64"):
        NeuronMap.load(path, model=wide_model)


def test_a_map_without_fingerprint_cannot_be_checked(tiny_map, tiny_model):
    import dataclasses

    with pytest.raises(IncompatibleModelError, match="no model fingerprint"):
        dataclasses.replace(tiny_map, fingerprint={}).check_compatible(tiny_model)


@pytest.mark.parametrize("where", ["header", "config", "tensors", "end"])
def test_a_flipped_byte_anywhere_gives_a_clear_error(tiny_map, tmp_path, where):
    path = tiny_map.save(tmp_path / "map.safetensors")
    data = bytearray(path.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    header = data[8:8 + header_length].decode()
    offset = {"header": 8 + 2,  # inside the JSON syntax of the header
              # a digit of tau_d inside the config (still valid JSON afterwards)
              "config": 8 + next(i for i in range(header.index("tau_d"), len(header)) if header[i].isdigit()),
              "tensors": 8 + header_length + 5, "end": len(data) - 1}[where]
    data[offset] = (data[offset] + 1) % 256 if where != "config" else ord("9") if data[offset] != ord("9") else ord("8")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"(corrupted|truncated).*re-create it with save\(\)"):
        NeuronMap.load(path)


@pytest.mark.parametrize("keep", [5, 100, -1])
def test_a_truncated_map_gives_a_clear_error(tiny_map, tmp_path, keep):
    path = tiny_map.save(tmp_path / "map.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(ValueError, match=r"truncated or corrupted.*re-create it with save\(\)"):
        NeuronMap.load(path)


def test_other_files_are_refused_clearly(tiny_map, tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a dpn-lens map artifact"):
        NeuronMap.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NeuronMap.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"saved as \.safetensors"):
        tiny_map.save(tmp_path / "map.pt")


def test_same_inputs_give_bitwise_identical_map_files(tiny_model, tmp_path):
    first = build_map(tiny_model, seed=30).save(tmp_path / "a.safetensors")
    second = build_map(tiny_model, seed=30).save(tmp_path / "b.safetensors")
    assert first.read_bytes() == second.read_bytes()
    # ... and across processes too (safetensors writes its metadata map in hash order).
    script = textwrap.dedent(f"""
        from dpn_lens import NeuronMap
        NeuronMap.load({str(first)!r}).save({str(tmp_path / 'c.safetensors')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert (tmp_path / "c.safetensors").read_bytes() == first.read_bytes()


def test_an_interrupted_save_leaves_the_previous_file_intact(tiny_map, tmp_path):
    """A child process overwrites an existing map, is SIGKILLed halfway through writing, and the
    old map is still there, complete and loadable."""
    path = tiny_map.save(tmp_path / "map.safetensors")
    original = path.read_bytes()
    started = tmp_path / "started"
    script = textwrap.dedent(f"""
        import time, pathlib
        import safetensors.torch
        from dpn_lens import NeuronMap

        def slow_save(tensors, filename, metadata=None):
            data = safetensors.torch.save(tensors, metadata=metadata)
            with open(filename, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                pathlib.Path({str(started)!r}).write_text(filename)
                time.sleep(60)
                handle.write(data[len(data) // 2:])

        safetensors.torch.save_file = slow_save
        neuron_map = NeuronMap.load({str(path)!r})
        neuron_map.trait = "openness"
        neuron_map.save({str(path)!r})
    """)
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert child.poll() is None, "the child exited before it started writing"
            assert time.monotonic() < deadline, "the child never started writing"
            time.sleep(0.05)
        partial = started.read_text()
        assert partial != str(path) and os.path.getsize(partial) > 0  # it writes beside the target
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == original
    assert_same_map(tiny_map, NeuronMap.load(path))


def test_saved_files_get_the_usual_permissions(tiny_map, tmp_path):
    """Atomic saves go through a private temporary file; the result must still be readable by others."""
    mask = os.umask(0o022)
    try:
        path = tiny_map.save(tmp_path / "map.safetensors")
    finally:
        os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (path.with_suffix(".json").stat().st_mode & 0o777) == 0o644


def test_a_failed_save_leaves_no_temporary_files(tiny_map, tmp_path, monkeypatch):
    import safetensors.torch

    path = tiny_map.save(tmp_path / "map.safetensors", write_json=False)

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        tiny_map.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.safetensors"]
    NeuronMap.load(path)


def test_reading_the_map(tiny_map):
    rows = tiny_map.neurons()
    assert len(rows) == tiny_map.n_selected() == tiny_map.n_selected("high") + tiny_map.n_selected("low")
    assert {r["pole"] for r in rows} == {"high", "low"}
    counts = tiny_map.counts_per_layer()
    assert sum(h + l for h, l in counts.values()) == tiny_map.n_selected()
    assert tiny_map.fraction_selected() == tiny_map.n_selected() / (3 * 48)
    assert tiny_map.pole("reversed") is tiny_map.low
    with pytest.raises(ValueError, match="unknown pole 'middle'; use 'high' or 'low'"):
        tiny_map.pole("middle")
