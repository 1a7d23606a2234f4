"""benchmarks/items.py end to end on the inline catalog with a tiny BERT: every row, the LoRA
switch, the report files."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_benchmarks import load_benchmark
from test_items_fixtures import write_domain
from test_items_train import _tiny_bert

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "items-minilm.yaml"


def test_items_benchmark_rows_and_report(tmp_path, tokenizer):
    bench = load_benchmark("items")
    args = argparse.Namespace(
        root=str(write_domain(tmp_path / "steam")),
        out=str(tmp_path / "out"),
        recipe=str(RECIPE),
        model=str(_tiny_bert(tmp_path, tokenizer)),
        train_per_task=3,
        test_per_task=2,
        catalog_size=3000,
        steps=1,
        batch_size=2,
        lr=None,
        holdout="UQ2I",
        no_ablation=True,
        lora=True,
        seed=0,
    )
    report = bench.run(args)
    bench.write_report(report, Path(args.out))
    base = args.model
    tuned = f"{base} fine-tuned (LoRA)"
    assert list(report["results"]) == ["BM25", base, tuned, f"{tuned} without UQ2I"]
    run_dir = Path(args.out) / "runs" / "v0"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()  # LoRA was on
    assert yaml.safe_load((run_dir / "train_config.yaml").read_text())["lora"]["enabled"] is True
    saved = json.loads((Path(args.out) / "results.json").read_text())
    for name, row in saved["results"].items():
        assert 0.0 <= row["mean"]["hit@5"] <= 1.0, name
        assert set(row["multi_turn"]) >= {"hit@5_session", "hit@5_last_turn"}
    md = (Path(args.out) / "results.md").read_text()
    assert "Hit@5 per task" in md and tuned in md
    assert saved["command"].startswith("python benchmarks/items.py") and saved["command"] in md
    assert (Path(args.out) / "hit5.png").stat().st_size > 0


def test_bad_arguments_are_one_line_errors_before_any_work(tmp_path):
    bench = load_benchmark("items")
    root = write_domain(tmp_path / "steam")
    out = tmp_path / "out"
    base = ["--root", str(root), "--out", str(out), "--recipe", str(RECIPE), "--steps", "1"]
    for extra, message in [
        (["--holdout", "XYZ"], r"--holdout 'XYZ' is none of the tasks \['UH2I'"),
        (["--test-per-task", "-1"], "--test-per-task must be at least 1, got -1"),
        (["--train-per-task", "0"], "--train-per-task must be at least 1, got 0"),
        (["--lr", "0"], "--lr must be positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            bench.main([*base, *extra])
    with pytest.raises(FileNotFoundError, match="--root .*nosteam: no such directory"):
        bench.main([*base, "--root", str(tmp_path / "nosteam")])
    with pytest.raises(FileNotFoundError, match="--recipe .*none.yaml: no such file"):
        bench.main([*base, "--recipe", str(tmp_path / "none.yaml")])
    assert not out.exists()  # nothing was built or trained
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "items.py"
    done = subprocess.run(
        [sys.executable, str(script), *base, "--holdout", "XYZ"], capture_output=True, text=True
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: --holdout 'XYZ'")
    assert not out.exists()


def test_results_record_the_machine_and_settings(tmp_path, monkeypatch):
    bench = load_benchmark("items")
    report = {
        "results": {},
        "timings_s": {"build": 1.0},
        "settings": {"steps": 2, "out": "x"},
        "machine": bench.machine("float32"),
    }
    monkeypatch.setattr(bench, "_heatmap", lambda results, path: None)
    bench.write_report(report, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert f"Machine: {report['machine']['cpu_model']}" in md and "dtype float32" in md
    assert "Settings: steps=2" in md
    assert report["machine"]["cpu_count"] and "cpu_model" in report["machine"]
