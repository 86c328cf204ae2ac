"""Issue 13: no silent wrong results.

Every CLI option that needs no model is checked before the model loads; expected errors are one line;
empty maps, unfired decode-only edits, maps of another model and extreme gamma are never silent; run
folders are transactions (manifest, lock, --resume, --overwrite, readers refuse unfinished or mixed runs).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import dpn_lens.models as models_module
import dpn_lens.pipeline as pipeline_module
from dpn_lens import ContrastiveSet, collect_statistics, steer, steering_intervention
from dpn_lens.cli import main
from dpn_lens.collection.collect import CollectionConfig
from dpn_lens.localization.localize import chance_bound, locate, pairs_for_bound, reselect
from dpn_lens.localization.neuron_map import IncompatibleModelError
from dpn_lens.pipeline import LocateConfig, locate_traits, parse_layers
from dpn_lens.run import (MANIFEST_FILE, Run, RunFolderError, check_run_folder, lock_run_folder, map_path,
                          read_manifest)
from helpers import random_prompts


@pytest.fixture(scope="module")
def tiny_map(tiny_model):
    pairs = ContrastiveSet("openness", random_prompts(60, 10), random_prompts(61, 10))
    return locate(collect_statistics(tiny_model, pairs, CollectionConfig(progress=False)),
                  q=0.8, tau_d=0.2, layers=[1, 2, 3])


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything loads a model: proves that validation happens first."""
    def refuse(*args, **kwargs):
        pytest.fail("load_model was called before the options were validated")
    monkeypatch.setattr(models_module, "load_model", refuse)


# ---------------------------------------------------------------- 1. validation before the model loads


@pytest.mark.parametrize("argv, message", [
    (["locate", "--q", "1.5"], r"--q must lie strictly between 0 and 1"),
    (["locate", "--q", "0"], r"--q must lie strictly between 0 and 1"),
    (["locate", "--tau-d", "-0.1"], r"--tau-d must be a finite effect size >= 0"),
    (["locate", "--tau-d", "nan"], r"--tau-d must be a finite effect size >= 0"),
    (["locate", "--n-pairs", "0"], r"--n-pairs must be at least 1"),
    (["locate", "--batch-size", "0"], r"--batch-size must be at least 1"),
    (["locate", "--layers", "5-3"], r"--layers '5-3': the range 5-3 runs backwards; write 3-5"),
    (["locate", "--layers", "a-b"], r"--layers 'a-b': 'a-b' is not a layer or a range"),
    (["locate", "--layers", "3,3"], r"increasing and distinct"),
    (["locate", "--traits", ","], r"--traits names no trait"),
    (["locate", "--traits", "humour"], r"unknown trait 'humour'"),
    (["locate", "--model", "no-such-model"], r"--model 'no-such-model' is not an embedded model"),
    (["locate", "--model", "missing.gguf"], r"GGUF file missing.gguf does not exist"),
    (["locate", "--dtype", "float8"], r"--dtype: unknown dtype 'float8'"),
    (["locate", "--device", "tpu"], r"--device 'tpu' is not a device"),
    (["steer", "--map", "MAP", "--prompt", "  "], r"--prompt #1 is empty"),
    (["steer", "--map", "MAP", "--prompt", "hi", "--gamma", "inf"], r"--gamma must be a finite number"),
    (["steer", "--map", "nowhere.safetensors", "--prompt", "hi"], r"--map nowhere.safetensors: no such file"),
    (["steer", "--map", "MAP", "--prompt", "hi", "--max-new-tokens", "0"], r"--max-new-tokens must be at least 1"),
    (["demo", "--n-pairs", "-5"], r"--n-pairs must be at least 1"),
])
def test_bad_options_fail_in_one_line_before_the_model_loads(argv, message, tiny_map, tmp_path, no_model_load,
                                                             capsys):
    map_file = tiny_map.save(tmp_path / "maps" / "openness.safetensors")
    argv = [str(map_file) if arg == "MAP" else arg for arg in argv]
    if argv[0] == "locate":
        argv += ["--out", str(tmp_path / "run")]
    if argv[0] == "demo":
        argv += ["--out", str(tmp_path / "demo"), "--figures", str(tmp_path / "figures")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dpn-lens {argv[0]}: error: ") and "\n" not in err
    assert re.search(message, err), err


def test_out_under_a_regular_file_or_on_a_file_fails_before_the_model_loads(tmp_path, no_model_load, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["locate", "--out", str(blocker / "run")]) == 2
    assert f"lies under the regular file {blocker}" in capsys.readouterr().err
    assert main(["locate", "--out", str(blocker)]) == 2
    assert "is a file; pass a folder" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_build_is_one_line(no_model_load, tmp_path, capsys):
    assert main(["locate", "--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    assert "--device cuda: this torch build sees no CUDA GPU" in capsys.readouterr().err


def test_an_unknown_bare_model_name_fails_at_once_and_hub_names_and_paths_pass(tmp_path):
    from dpn_lens.cli.options import check_model_spec

    with pytest.raises(ValueError, match="not an embedded model"):
        check_model_spec("smollm")                   # would otherwise wait on the hub's network retries
    check_model_spec("Qwen/Qwen2.5-7B-Instruct")     # hub-style: resolved when loaded
    check_model_spec(str(tmp_path))                  # an existing folder
    check_model_spec("smollm2-135m-instruct")


def test_parse_layers_accepts_ranges_and_lists():
    assert parse_layers("2-4,7") == [2, 3, 4, 7] and parse_layers(" 3 - 5 ") == [3, 4, 5] and parse_layers(None) is None


def test_ctrl_c_is_one_line_and_exit_130_and_debug_shows_the_traceback(monkeypatch, tmp_path, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(models_module, "load_model", interrupt)
    argv = ["locate", "--out", str(tmp_path / "run"), "--traits", "o"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("dpn-lens locate: interrupted") and "--resume" in err and "\n" not in err
    with pytest.raises(KeyboardInterrupt):
        main(["--debug"] + argv)


def test_version_flag(capsys):
    from dpn_lens._version import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"dpn-lens {__version__}"


# ---------------------------------------------------------------- 2. no silent no-ops


def test_an_empty_map_warns_at_locate_naming_the_pairs_the_chance_bound_needs(tiny_model):
    pairs = ContrastiveSet("openness", random_prompts(70, 8), random_prompts(71, 8))
    stats = collect_statistics(tiny_model, pairs, CollectionConfig(progress=False))
    with pytest.warns(UserWarning, match="selects no neurons") as caught:
        neuron_map = locate(stats)                   # proposed settings: tau_d is the chance bound of 8 pairs
    assert neuron_map.n_selected() == 0
    text = str(caught[0].message)
    needed = int(re.search(r"n_pairs=(\d+)", text).group(1))
    strongest = float(re.search(r"strongest candidate has \|d\| = ([0-9.]+)", text).group(1))
    n_tests = len(neuron_map.layers) * neuron_map.d_mlp
    # The named count is the first at which chance alone no longer explains the strongest effect.
    assert needed > 8
    assert chance_bound(needed, needed, n_tests) < strongest + 5e-4
    assert chance_bound(needed - 1, needed - 1, n_tests) >= strongest - 5e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        locate(stats, q=0.8, tau_d=0.0, layers=[1, 2])   # a map with neurons: no warning


def test_pairs_for_bound_is_the_smallest_count_below_the_effect():
    for effect, n_tests in ((0.3, 30 * 1536), (0.8, 64), (1.5, 10)):
        n = pairs_for_bound(effect, n_tests)
        assert chance_bound(n, n, n_tests) < effect <= chance_bound(n - 1, n - 1, n_tests)


def test_steer_refuses_an_edit_of_an_empty_map(tiny_model, tiny_map):
    with pytest.warns(UserWarning, match="selects no neurons"):
        empty = reselect(tiny_map, tau_d=1e6)
    with pytest.raises(ValueError, match="its neuron map selects no neurons, so it would change nothing"):
        with steer(tiny_model, steering_intervention(empty)):
            pass


def test_cli_steer_refuses_an_empty_map_before_the_model_loads(tiny_map, tmp_path, no_model_load, capsys):
    with pytest.warns(UserWarning):
        empty = reselect(tiny_map, tau_d=1e6)
    path = empty.save(tmp_path / "openness.safetensors")
    assert main(["steer", "--map", str(path), "--prompt", "hi"]) == 2
    assert "selects no neurons, so steering with it would change nothing" in capsys.readouterr().err


def test_a_decode_only_edit_that_never_fired_warns_once_naming_positions_all(tiny_model, tiny_map):
    tokens = tiny_model.to_tokens(["you are kind and open to new ideas"])
    edit = steering_intervention(tiny_map, gamma=2.0)
    for run in (lambda: tiny_model(tokens),
                lambda: tiny_model.run_with_hooks(tokens),
                lambda: tiny_model.generate(tokens, max_new_tokens=3, do_sample=False, verbose=False,
                                            use_past_kv_cache=False)):
        with pytest.warns(RuntimeWarning, match=r'never fired.*positions="all"') as caught:
            with steer(tiny_model, edit):
                run()
        assert len([w for w in caught if "never fired" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with steer(tiny_model, edit):                       # KV-cached generation has decode steps
            tiny_model.generate(tokens, max_new_tokens=3, do_sample=False, verbose=False)
        with steer(tiny_model, edit.at_positions("all")):  # edits every position: fires under model(...)
            tiny_model(tokens)


def test_steer_checks_the_model_fingerprint_by_default(tiny_model, other_tiny_model, tiny_map):
    edit = steering_intervention(tiny_map)
    with pytest.raises(IncompatibleModelError, match="located on a different model.*weights"):
        with steer(other_tiny_model, edit):                 # same shapes, other weights
            pass
    with pytest.raises(IncompatibleModelError):
        with steer(other_tiny_model, -edit * 0.5):           # derived edits keep the fingerprint
            pass
    with steer(other_tiny_model, edit, check=False):         # the explicit opt-out
        pass
    with steer(tiny_model, edit):                            # its own model: fine
        pass


def test_extreme_gamma_warns_with_the_usual_range(tiny_map):
    with pytest.warns(UserWarning, match=r"gamma=1e\+06 is far outside the usual range \|gamma\| <= 256"):
        steering_intervention(tiny_map, gamma=1e6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steering_intervention(tiny_map, gamma=2.0)


def test_empty_questions_are_refused_by_generate_answer(tiny_model):
    from dpn_lens.demo import generate_answer

    with pytest.raises(ValueError, match="question is empty"):
        generate_answer(tiny_model, "   ")


# ---------------------------------------------------------------- 3. run folders as transactions


def _config(traits=("openness", "extraversion"), n_pairs=6, **overrides):
    return LocateConfig(list(traits), n_pairs=n_pairs, q=0.8, tau_d=0.1, layers=[1, 2, 3],
                        collection=CollectionConfig(progress=False), **overrides)


def _quiet(message):
    pass


def test_a_finished_run_has_a_complete_manifest_with_checksums(tiny_model, tmp_path):
    folder = tmp_path / "run"
    run = locate_traits(tiny_model, _config(), out=folder, log=_quiet)
    manifest = read_manifest(folder)
    assert manifest["status"] == "complete" and manifest["settings"]["n_pairs"] == 6
    assert manifest["data"] == {"source": "embedded", "seed": 42, "n_pairs": 6, "data_dir": None}
    assert manifest["fingerprint"]["n_layers"] == tiny_model.cfg.n_layers
    import hashlib

    for trait in run.traits:
        assert manifest["traits"][trait]["map_sha256"] == hashlib.sha256(map_path(folder, trait).read_bytes()).hexdigest()
    assert Run.load(folder).traits == ["openness", "extraversion"]


def test_an_interrupted_run_is_refused_by_readers_and_resume_reuses_finished_traits(tiny_model, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    real_collect = pipeline_module.collect_statistics
    collected = []

    def interrupt_second(model, pairs, config=None):
        collected.append(pairs.trait)
        if len(collected) == 2:
            raise KeyboardInterrupt
        return real_collect(model, pairs, config)
    monkeypatch.setattr(pipeline_module, "collect_statistics", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        locate_traits(tiny_model, _config(), out=folder, log=_quiet)
    manifest = read_manifest(folder)
    assert manifest["status"] == "running"
    assert manifest["traits"]["openness"]["status"] == "done" and manifest["traits"]["extraversion"]["status"] == "pending"
    with pytest.raises(RunFolderError, match=r"unfinished run \(done: openness; not done: extraversion\).*--resume"):
        Run.load(folder)
    from dpn_lens.report.html import build_report
    with pytest.raises(RunFolderError, match="unfinished run"):
        build_report(folder)

    collected.clear()
    monkeypatch.setattr(pipeline_module, "collect_statistics",
                        lambda model, pairs, config=None: (collected.append(pairs.trait), real_collect(model, pairs, config))[1])
    resumed = locate_traits(tiny_model, _config(), out=folder, log=_quiet, resume=True)
    assert collected == ["extraversion"]                   # openness's statistics were reused
    fresh = locate_traits(tiny_model, _config(), out=tmp_path / "fresh", log=_quiet)
    for trait in fresh.traits:
        assert resumed.maps[trait].high.keys() == fresh.maps[trait].high.keys()
        for layer in fresh.maps[trait].layers:
            assert torch.equal(resumed.maps[trait].high[layer], fresh.maps[trait].high[layer])
            assert torch.equal(resumed.maps[trait].low[layer], fresh.maps[trait].low[layer])
    assert read_manifest(folder)["status"] == "complete" and Run.load(folder).traits == fresh.traits


def test_resume_with_other_settings_and_rerun_with_other_settings_are_refused_unless_overwrite(tiny_model, tmp_path):
    folder = tmp_path / "run"
    locate_traits(tiny_model, _config(n_pairs=6), out=folder, log=_quiet)
    with pytest.raises(RunFolderError, match=r"other settings \(n_pairs: 6 -> 8.*--resume needs the same settings"):
        locate_traits(tiny_model, _config(n_pairs=8), out=folder, log=_quiet, resume=True)
    with pytest.raises(RunFolderError, match=r"other settings \(n_pairs: 6 -> 8\).*--overwrite"):
        locate_traits(tiny_model, _config(n_pairs=8), out=folder, log=_quiet)
    assert read_manifest(folder)["settings"]["n_pairs"] == 6      # the refused run changed nothing
    locate_traits(tiny_model, _config(traits=["neuroticism"], n_pairs=8), out=folder, log=_quiet, overwrite=True)
    assert Run.load(folder).traits == ["neuroticism"] and json.loads((folder / "summary.json").read_text())[
        "traits"]["neuroticism"]["n_pairs"] == 8


def test_a_folder_with_maps_but_no_manifest_is_not_written_over_silently(tiny_model, tmp_path):
    folder = tmp_path / "run"
    locate_traits(tiny_model, _config(traits=["openness"]), out=folder, log=_quiet)
    (folder / MANIFEST_FILE).unlink()                          # as an older version left it
    with pytest.raises(RunFolderError, match="already holds maps or statistics of another run"):
        locate_traits(tiny_model, _config(traits=["openness"]), out=folder, log=_quiet)
    import dpn_lens.run as run_module

    run_module._WARNED_OLD.clear()
    with pytest.warns(UserWarning, match="has no manifest.json"):  # older runs are still read
        assert Run.load(folder).traits == ["openness"]


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tiny_model, tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from dpn_lens.run import lock_run_folder
        with lock_run_folder({str(folder)!r}):
            print("locked", flush=True)
            sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=r"another process is writing .*run.*pass another --out"):
            locate_traits(tiny_model, _config(), out=folder, log=_quiet)
    finally:
        holder.communicate("done\n", timeout=60)
    locate_traits(tiny_model, _config(traits=["openness"]), out=folder, log=_quiet)   # free again
    with lock_run_folder(folder):                              # and in one process: refused too
        with pytest.raises(RunFolderError, match="another process is writing"):
            locate_traits(tiny_model, _config(traits=["openness"]), out=folder, log=_quiet)


def test_a_mixed_folder_is_refused_by_every_reader(tiny_model, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    locate_traits(tiny_model, _config(traits=["openness"]), out=first, log=_quiet)
    locate_traits(tiny_model, _config(traits=["openness", "neuroticism"], n_pairs=8), out=second, log=_quiet)
    shutil.copy(map_path(second, "neuroticism"), map_path(first, "neuroticism"))     # copied in from another run
    with pytest.raises(RunFolderError, match=r"neuroticism.safetensors is not part of the run.*mixes runs"):
        Run.load(first)
    map_path(first, "neuroticism").unlink()
    shutil.copy(map_path(second, "openness"), map_path(first, "openness"))           # replaced by another run's
    with pytest.raises(RunFolderError, match=r"openness.safetensors was replaced after the run"):
        check_run_folder(first)
    assert main(["report", "--run", str(first), "--out", str(tmp_path / "page.html")]) == 2
    assert "was replaced after the run" in capsys.readouterr().err
    assert main(["study", "layers", "--run", str(first), "--out", str(tmp_path / "figures")]) == 2
    assert "was replaced after the run" in capsys.readouterr().err
    assert main(["steer", "--map", str(map_path(first, "openness")), "--prompt", "hi"]) == 2
    assert "was replaced after the run" in capsys.readouterr().err


def test_cli_ctrl_c_during_locate_leaves_a_resumable_folder(tiny_folder, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    argv = ["locate", "--model", str(tiny_folder), "--traits", "o,N", "--n-pairs", "6", "--layers", "0-2", "--q", "0.8",
            "--tau-d", "0.1", "--out", str(run), "--no-progress"]
    real_collect = pipeline_module.collect_statistics
    calls = []

    def interrupt_second(model, pairs, config=None):
        calls.append(pairs.trait)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_collect(model, pairs, config)
    monkeypatch.setattr(pipeline_module, "collect_statistics", interrupt_second)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dpn-lens locate: interrupted; finished traits are kept: add --resume")
    assert main(["report", "--run", str(run), "--out", str(tmp_path / "page.html")]) == 2
    assert "unfinished run" in capsys.readouterr().err
    assert main(argv + ["--n-pairs", "7", "--resume"]) == 2
    assert "other settings (n_pairs: 6 -> 7" in capsys.readouterr().err
    calls.clear()
    assert main(argv + ["--resume"]) == 0
    assert calls == ["neuroticism"] and read_manifest(run)["status"] == "complete"
    assert main(["report", "--run", str(run), "--out", str(tmp_path / "page.html")]) == 0


def test_cli_refuses_a_locked_folder_or_other_settings_before_the_model_loads(tiny_model, tmp_path, no_model_load,
                                                                              capsys):
    folder = tmp_path / "run"
    locate_traits(tiny_model, _config(traits=["openness"]), out=folder, log=_quiet)
    argv = ["locate", "--traits", "o", "--n-pairs", "9", "--out", str(folder)]
    assert main(argv) == 2
    assert "holds a run with other settings" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 2
    assert "--resume needs the same settings" in capsys.readouterr().err
    assert main(argv + ["--resume", "--overwrite"]) == 2
    assert "contradict each other" in capsys.readouterr().err
    assert main(["locate", "--traits", "o", "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    with lock_run_folder(folder):
        assert main(argv + ["--overwrite"]) == 2
        assert "another process is writing" in capsys.readouterr().err
    assert read_manifest(folder)["settings"]["n_pairs"] == 6           # the refused commands changed nothing
