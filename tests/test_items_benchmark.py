"""benchmarks/items.py end to end on the inline catalog with a tiny BERT: every row, the LoRA
switch, the report files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    assert (Path(args.out) / "hit5.png").stat().st_size > 0
