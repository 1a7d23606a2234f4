"""benchmarks/ablation_seeds.py: each (recipe, seed) trained once, searched, tabulated."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fixtures import write
from test_benchmarks import load_benchmark, write_mtrag
from test_train import _recipe


@pytest.fixture(scope="module")
def ab():
    return load_benchmark("ablation_seeds")


def test_recipes_times_seeds_train_once_then_search_and_tabulate(
    ab, tmp_path, tiny_llama_dir, capsys
):
    pytest.importorskip("ir_measures")
    base = _recipe(tmp_path / "a", tiny_llama_dir)
    alpha0 = _recipe(tmp_path / "b", tiny_llama_dir, loss={"alpha": 0.0})
    out, data = tmp_path / "out", write_mtrag(tmp_path / "mtrag")
    argv = ["--recipe", f"csit={base}", "--recipe", f"alpha0={alpha0}", "--seeds", "1", "2",
            "--parallel", "2", "--out", str(out), "--data", str(data)]  # fmt: skip
    assert ab.main(argv) == 0
    names = ["csit-s1", "csit-s2", "alpha0-s1", "alpha0-s2"]
    for name in names:
        assert (out / "runs" / name / "chatretriever.json").is_file()
        assert (out / "logs" / f"{name}.log").is_file()
    recipe = (out / "runs" / "alpha0-s2" / "train_config.yaml").read_text()
    assert "seed: 2" in recipe and "alpha: 0.0" in recipe
    adapters = {n: (out / "runs" / n / "adapter_model.safetensors").read_bytes() for n in names}
    assert adapters["csit-s1"] != adapters["csit-s2"]  # the seed reaches the run

    table = out / "eval.all"  # every task of the data (no --eval-conversations), whole corpus
    assert (table / "bench" / "runs" / "alpha0-s1.session.trec").is_file()
    summary = json.loads((table / "seeds.json").read_text())
    rows = {r["label"]: r for r in summary["rows"]}
    assert list(rows) == ["csit", "alpha0"] and summary["reference"] == "csit"
    assert all(r["n"] == 2 and len(r["per_run"]) == 2 for r in rows.values())
    assert [p.split("/")[-1] for p in rows["alpha0"]["runs"]] == [
        "alpha0-s1.session.trec", "alpha0-s2.session.trec"]  # fmt: skip
    assert "vs_reference" in rows["alpha0"] and "vs_reference" not in rows["csit"]
    assert (table / "seeds.md").is_file() and (table / "seeds.png").is_file()

    # again: nothing is trained, every run is read back, the same table
    capsys.readouterr()
    assert ab.main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 of 4 runs already trained; 0 to train" in printed
    assert printed.count("cached run") == 4
    assert {n: (out / "runs" / n / "adapter_model.safetensors").read_bytes() for n in names} == (
        adapters
    )
    assert json.loads((table / "seeds.json").read_text())["rows"] == summary["rows"]


def test_a_failed_run_is_named_with_its_log_and_the_others_still_train(
    ab, tmp_path, tiny_llama_dir, capsys
):
    good = _recipe(tmp_path / "a", tiny_llama_dir)
    bad = write(tmp_path / "bad.yaml", f"model: {tiny_llama_dir}\noutput_dir: x\n")  # no data
    out = tmp_path / "out"
    argv = ["--recipe", str(good), "--recipe", str(bad), "--seeds", "7", "--parallel", "2",
            "--out", str(out), "--train-only"]  # fmt: skip
    assert ab.main(argv) == 1
    err = capsys.readouterr().err
    assert "1 runs failed" in err and "bad-s7: exit 2" in err
    assert "data" in err and str(out / "logs" / "bad-s7.log") in err
    assert (out / "runs" / "recipe-s7" / "chatretriever.json").is_file()
    assert not (out / "runs" / "bad-s7").exists()


def test_plan_checks_recipes_labels_and_seeds(ab, tmp_path):
    a = write(tmp_path / "a" / "r.yaml", "model: m\n")
    b = write(tmp_path / "b" / "r.yaml", "model: m\n")
    jobs = ab.plan([f"x={a}", str(b)], [42, 1], tmp_path / "out")
    assert [j.name for j in jobs] == ["x-s42", "x-s1", "r-s42", "r-s1"]
    assert not any(j.finished for j in jobs)
    with pytest.raises(ValueError, match="labels must differ"):
        ab.plan([str(a), str(b)], [1], tmp_path)
    with pytest.raises(ValueError, match="seeds must differ"):
        ab.plan([str(a)], [1, 1], tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        ab.plan([str(tmp_path / "missing.yaml")], [1], tmp_path)
    held_out = argparse.Namespace(out=Path("o"), eval_conversations="c/heldout.txt", pool=30)
    assert ab.eval_dir(held_out) == Path("o/eval.heldout.pool30")  # apart from other evaluations
    command = ab.train_command(jobs[0], ["loss.alpha=0"])
    assert command[3:6] == ["train", str(a), "--resume"]
    assert command[6:] == ["--set", "training.seed=42", "--set", f"output_dir={jobs[0].out}",
                           "--set", "loss.alpha=0"]  # fmt: skip


def test_bad_input_ends_as_one_error_line(tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "ablation_seeds.py"
    missing = tmp_path / "missing.yaml"
    done = subprocess.run(
        [sys.executable, str(script), "--recipe", str(missing), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2  # bad input, as argparse's usage errors
    assert done.stderr.strip().splitlines() == [
        f"error: --recipe '{missing}': no such file {missing}"
    ]
    assert not (tmp_path / "o").exists()


def test_sigterm_stops_the_trainings_it_started(ab, tmp_path, monkeypatch):
    recipe = write(tmp_path / "r.yaml", "model: m\n")
    jobs = ab.plan([str(recipe)], [1, 2, 3], tmp_path / "out")
    started = tmp_path / "started"
    sleeper = (
        "import pathlib, sys, time; "
        f"pathlib.Path({str(started)!r}).joinpath(sys.argv[1]).touch(); time.sleep(60)"
    )
    procs = []
    real_popen = subprocess.Popen

    def popen(command, **kwargs):
        name = command[-1].rsplit("/", 1)[-1]  # output_dir=.../runs/<name>
        proc = real_popen([sys.executable, "-c", sleeper, name], **kwargs)
        procs.append(proc)
        return proc

    monkeypatch.setattr(ab.subprocess, "Popen", popen)
    started.mkdir()

    def stop_when_both_run():
        deadline = time.monotonic() + 30
        while len(list(started.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_both_run, daemon=True).start()
    before = signal.getsignal(signal.SIGTERM)
    begin = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        ab.train(jobs, [], parallel=2, logs=tmp_path / "logs")
    assert time.monotonic() - begin < 20  # not the sleepers' 60 s
    assert len(procs) == 2  # the third run never started
    assert all(p.poll() is not None for p in procs)  # both stopped
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back


def _fake_training(ab, monkeypatch):
    """`chatretriever train` replaced by a process that marks its output_dir finished."""
    trained = []
    real_popen = subprocess.Popen

    def popen(command, **kwargs):
        out = next(a.split("=", 1)[1] for a in command if a.startswith("output_dir="))
        trained.append(Path(out).name)
        code = f"import pathlib; p = pathlib.Path({out!r}); p.mkdir(parents=True); "
        code += "(p / 'chatretriever.json').write_text('{}')"
        return real_popen([sys.executable, "-c", code], **kwargs)

    monkeypatch.setattr(ab.subprocess, "Popen", popen)
    return trained


def test_a_run_trained_with_another_config_is_refused_or_retrained(ab, tmp_path, monkeypatch):
    recipe = write(tmp_path / "r.yaml", "model: m\ntraining: {max_steps: 2}\n")
    trained = _fake_training(ab, monkeypatch)
    out = tmp_path / "out"
    argv = ["--recipe", str(recipe), "--seeds", "1", "2", "--out", str(out), "--train-only"]
    assert ab.main(argv) == 0 and trained == ["r-s1", "r-s2"]
    record = json.loads((out / "runs" / "r-s1.config.json").read_text())
    assert record["config"]["training"] == {"max_steps": 2, "seed": 1}
    assert ab.main(argv) == 0 and len(trained) == 2  # the same config: reused
    logs = [*argv, "--set", "training.logging_steps=1"]  # logging is not the model: reused
    assert ab.main(logs) == 0 and len(trained) == 2
    changed = [*argv, "--set", "training.max_steps=50"]
    with pytest.raises(ValueError, match=r"run r-s1 .*another config \(and 1 more runs\): "
                       r"training.max_steps: 2 -> 50; pass --retrain"):  # fmt: skip
        ab.main(changed)
    assert len(trained) == 2  # nothing trained, nothing moved
    write(recipe, "model: m\ntraining: {max_steps: 2, learning_rate: 0.1}\n")  # the recipe too
    with pytest.raises(ValueError, match=r"training.learning_rate: '-' -> 0.1"):
        ab.main(argv)
    assert ab.main([*changed, "--retrain"]) == 0 and trained[2:] == ["r-s1", "r-s2"]
    assert (out / "runs" / "r-s1.replaced" / "chatretriever.json").is_file()  # kept aside
    assert ab.main(changed) == 0 and len(trained) == 4


def test_a_run_trained_before_configs_were_recorded_is_checked_on_its_saved_recipe(
    ab, tmp_path, monkeypatch
):
    recipe = write(tmp_path / "r.yaml", "model: m\ntraining: {max_steps: 2}\n")
    run = tmp_path / "out" / "runs" / "r-s1"
    write(run / "chatretriever.json", "{}")
    write(run / "train_config.yaml", "model: m\ntraining: {max_steps: 3, seed: 1, x: 1}\n")
    _fake_training(ab, monkeypatch)
    argv = ["--recipe", str(recipe), "--seeds", "1", "--out", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"run r-s1 .*training.max_steps: 3 -> 2;"):
        ab.main([*argv, "--train-only"])
