"""benchmarks/conversational.py names its recall after the depth of its runs: R@k for a `--k`
below 100 (a run of k passages has no recall at 100 to report), R@100 otherwise; in the JSON,
the markdown table and the plot."""

from __future__ import annotations

import importlib.util
import json

import pytest
from test_benchmarks import load_benchmark, loads, mtrag  # noqa: F401 (fixtures)

from chatretriever.io.trec import read_run

HEAD = "| system | formulation | nDCG@3 | nDCG@10 | MRR@10 | {} | wall s |"


@pytest.fixture(scope="module")
def conv():
    return load_benchmark("conversational")


def test_measures_cut_recall_at_the_run_depth(conv):
    assert conv.report.measures(5) == ("nDCG@3", "nDCG@10", "RR@10", "R@5")
    assert conv.report.measures(100)[-1] == "R@100" == conv.report.MEASURES[-1]
    assert conv.report.measures(1000)[-1] == "R@100"  # deeper runs: still recall at 100
    assert conv.report.measures()[-1] == "R@100"


def test_results_name_recall_after_k_in_json_table_and_plot(
    conv,
    mtrag,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    pytest.importorskip("bm25s")
    pytest.importorskip("ir_measures")
    from chatretriever.io.mtrag import load_mtrag
    from chatretriever.retrieval.evaluate import evaluate_run

    legends: list[list[str]] = []
    save_figure = conv.report.save_figure

    def record_legend(plt, fig, path):  # then saves it as the script does
        legends.append([t.get_text() for t in fig.axes[0].get_legend().get_texts()])
        save_figure(plt, fig, path)

    monkeypatch.setattr(conv.report, "save_figure", record_legend)
    out = tmp_path / "out"
    argv = ["--data", str(mtrag), "--out", str(out), "--systems", "bm25"]
    assert conv.main([*argv, "--k", "2"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["measures"] == ["nDCG@3", "nDCG@10", "RR@10", "R@2"]
    qrels = load_mtrag(mtrag).qrels
    for system in result["systems"]:
        assert set(system["metrics"]) == {"nDCG@3", "nDCG@10", "RR@10", "R@2"}
        # what is reported is the recall of the 2-deep run: ir_measures' R@100 of it is the same
        run = evaluate_run(read_run(system["run"]), qrels, ["R@100"])
        assert system["metrics"]["R@2"] == pytest.approx(run.aggregate["R@100"])
    md = (out / "results.md").read_text()
    assert HEAD.format("R@2") in md and "R@100" not in md

    assert conv.main(argv) == 0  # the default --k 100: R@100, as before
    result = json.loads((out / "results.json").read_text())
    assert result["measures"][-1] == "R@100"
    assert all("R@100" in s["metrics"] for s in result["systems"])
    assert HEAD.format("R@100") in (out / "results.md").read_text()
    assert json.loads((out / "results.prev.json").read_text())["measures"][-1] == "R@2"
    if importlib.util.find_spec("matplotlib"):
        assert legends == [["nDCG@3", "R@2"], ["nDCG@3", "R@100"]]
