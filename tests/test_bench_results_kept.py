"""Benchmark results are never silently replaced: a run with other settings keeps the previous
result set as <stem>.prev[-N]<suffix> (`benchmarks/_shared/paths.keep_previous`); a rerun with
the same settings replaces it. Checked by hand and through the real write paths of seeds.py,
robustness.py, rationale.py (cost) and serve_load.py."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from test_benchmarks import BENCHMARKS, load_benchmark, loads, mtrag  # noqa: F401 (fixtures)
from test_rationale_cli import write_esconv_split
from test_seeds_benchmark import data, run_file  # noqa: F401 (fixture)

sys.path.insert(0, str(BENCHMARKS))
from _shared.machine import machine  # noqa: E402
from _shared.paths import keep_previous, run_settings  # noqa: E402

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _contents(out: Path, names: list[str]) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in names if (out / n).exists()}


def _aside(name: str, tag: str = ".prev") -> str:
    stem, _, suffix = name.rpartition(".")
    return f"{stem}{tag}.{suffix}"


def _check_rerun_then_other_settings(run, argv, other, out: Path, names: list[str]) -> None:
    """`run(argv)` writes `names` into `out`; the same argv again replaces them (nothing kept),
    `argv + other` keeps the files it finds, byte for byte, as *.prev.*."""
    assert run(argv) == 0
    assert set(_contents(out, names)) == set(names)
    assert run(argv) == 0  # the same settings: a rerun, replaced in place
    assert not list(out.glob("*.prev*"))
    before = _contents(out, names)
    assert json.loads(before[names[0]])["settings"]  # what the next run is compared with
    assert run([*argv, *other]) == 0
    assert _contents(out, [_aside(n) for n in names]) == {_aside(n): b for n, b in before.items()}
    now = json.loads((out / names[0]).read_text())["settings"]
    assert now != json.loads(before[names[0]])["settings"]
    assert not list(out.glob("*.prev-2*"))  # one set kept, once


def test_run_settings_leave_out_where_results_go_and_are_json(tmp_path):
    args = argparse.Namespace(out=tmp_path, data=Path("d"), sizes=(1, 2), verbose=True, k=5)
    assert run_settings(args, "verbose") == {"data": "d", "sizes": [1, 2], "k": 5}


def test_keep_previous_numbers_each_kept_set_and_says_so(tmp_path, capsys):
    files = [tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"]
    assert keep_previous(files, {"k": 1}) is None  # nothing there yet

    def write(settings: dict, text: str) -> None:
        files[0].write_text(json.dumps({"settings": settings, "text": text}))
        files[1].write_text(text)
        files[2].write_bytes(text.encode())

    write({"k": 1, "p": "/x"}, "one")
    assert keep_previous(files, {"k": 1, "p": Path("/x")}) is None  # the same settings
    assert not list(tmp_path.glob("*.prev*")) and capsys.readouterr().out == ""
    assert keep_previous(files, {"k": 2}) == tmp_path / "r.prev.json"
    assert "kept as" in capsys.readouterr().out and not files[0].exists()
    assert (tmp_path / "r.prev.md").read_text() == "one"
    write({"k": 2}, "two")
    files[2].unlink()  # a set without its plot (matplotlib missing) is kept all the same
    assert keep_previous(files, {"k": 3}) == tmp_path / "r.prev-2.json"
    assert (tmp_path / "r.prev-2.md").read_text() == "two"
    assert (tmp_path / "r.prev.png").read_bytes() == b"one"  # the first set untouched
    files[0].write_text('{"no": "settings"}')  # results written before settings were recorded
    assert keep_previous(files[:1], {"k": 3}) == tmp_path / "r.prev-3.json"


def test_seeds_keeps_the_table_of_other_runs(data, tmp_path):  # noqa: F811
    pytest.importorskip("ir_measures")
    seeds = load_benchmark("seeds")
    runs = tmp_path / "runs"
    run_file(runs / "a-s1.trec", [1, 1, 2])
    run_file(runs / "a-s2.trec", [1, 2, 2])
    run_file(runs / "b-s1.trec", [3, 1, 1])
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--group", f"A={runs}/a-s*.trec"]
    names = ["seeds.json", "seeds.md", *(["seeds.png"] if HAVE_MATPLOTLIB else [])]
    other = ["--group", f"B={runs}/b-s1.trec"]
    _check_rerun_then_other_settings(seeds.main, argv, other, out, names)
    kept = json.loads((out / "seeds.prev.json").read_text())
    assert [r["label"] for r in kept["rows"]] == ["A"]
    assert [r["label"] for r in json.loads((out / "seeds.json").read_text())["rows"]] == ["A", "B"]


def test_robustness_keeps_the_results_of_other_settings(mtrag, tmp_path, monkeypatch):  # noqa: F811
    pytest.importorskip("bm25s")
    pytest.importorskip("ir_measures")
    from test_robustness import ChoosingLLM

    from chatretriever.retrieval.robustness import hf_generator

    rob = load_benchmark("robustness")
    monkeypatch.setattr(hf_generator, "hf_batch_generator", lambda *a: ChoosingLLM("reasonable"))
    out = tmp_path / "out"
    argv = ["--data", str(mtrag), "--out", str(out), "--eval-conversations", "",
            "--systems", "bm25", "--generator", "fake-llm", "--contexts", "2",
            "--judge-check", "0"]  # fmt: skip
    names = ["robustness.json", "robustness.md", *(["robustness.png"] if HAVE_MATPLOTLIB else [])]
    _check_rerun_then_other_settings(rob.main, argv, ["--contexts", "3"], out, names)
    kept = json.loads((out / "robustness.prev.json").read_text())
    assert kept["settings"]["contexts"] == 2
    assert len(json.loads((out / "robustness.json").read_text())["full_fallbacks"]) == 3


def test_rationale_cost_keeps_other_curves_and_records_the_shared_machine(tmp_path, tiny_llama_dir):
    pytest.importorskip("matplotlib")  # the cost plot needs it
    rationale = load_benchmark("rationale")
    split = write_esconv_split(tmp_path, train=[0], evals=[1, 2])  # 4 eval queries
    out = tmp_path / "out"
    argv = ["cost", "--model", str(tiny_llama_dir), "--candidates", "2", "--doc-tokens", "8",
            "--queries", "1", "--split", str(split), "--out", str(out)]  # fmt: skip
    names = ["cost.json", "cost.md", "cost.png"]
    _check_rerun_then_other_settings(rationale.main, argv, ["--candidates", "3"], out, names)
    kept = json.loads((out / "cost.prev.json").read_text())
    assert [r["candidates"] for r in kept["rows"]] == [2]
    assert kept["settings"]["candidates"] == [2]
    # the machine as every benchmark records it (`_shared/machine.py`), plus the load and command
    env = json.loads((out / "cost.json").read_text())["environment"]
    assert set(machine()) <= set(env) and "cpu" not in env
    assert {"loadavg_1_5_15", "command"} <= set(env)
    md = (out / "cost.md").read_text()
    assert md.startswith(f"`{env['command']}` on {env['cpu_model']} ({env['cpu_count']} cores, ")


def test_serve_load_keeps_other_measurements_and_records_no_api_key(tmp_path):
    pytest.importorskip("faiss")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from server_helpers import KEY, build_fake_index, make_app, running_server

    bench = load_benchmark("serve_load")
    index_dir, encoder = build_fake_index(tmp_path)
    out = tmp_path / "out"
    with running_server(make_app(index_dir, encoder, api_keys=(KEY,), max_batch=4)) as url:
        argv = ["--url", url, "--api-key", KEY, "--requests", "12", "--concurrency", "3",
                "--out", str(out)]  # fmt: skip
        names = ["serve_load.json", "serve_load.md"]
        _check_rerun_then_other_settings(bench.main, argv, ["--k", "2"], out, names)
    kept = json.loads((out / "serve_load.prev.json").read_text())
    assert kept["settings"]["k"] == 10 and kept["settings"]["requests"] == 12
    for name in [*names, "serve_load.prev.json", "serve_load.prev.md"]:
        assert KEY not in (out / name).read_text()  # a secret, not a setting
    # the key given in any form argparse takes is left out of the recorded command
    argv = ["--api-key", KEY, "--api-key=k2", "--api", "k3", "--k", "2"]
    assert bench.redacted(argv) == ["--api-key", "***", "--api-key=***", "--api", "***", "--k", "2"]
