"""benchmarks/seeds.py: mean +- sd over seeds and the paired test of seed-averaged runs."""

from __future__ import annotations

import json
import statistics

import pytest
from fixtures import write
from test_benchmarks import load_benchmark

TASKS = "".join(
    json.dumps(
        {
            "conversation_id": qid.split("<::>")[0],
            "task_id": qid,
            "turn": qid[-1],
            "input": [{"speaker": "user", "text": f"question {qid}"}],
            "targets": [{"text": "an answer"}],
            "contexts": [],
            "Collection": "mt-clapnq",
        }
    )
    + "\n"
    for qid in ("cA<::>1", "cA<::>2", "cB<::>1")
)
QRELS = "query-id\tcorpus-id\tscore\ncA<::>1\td1\t1\ncA<::>2\td2\t1\ncB<::>1\td3\t1\n"


RELEVANT = (("cA<::>1", "d1"), ("cA<::>2", "d2"), ("cB<::>1", "d3"))


def run_file(path, ranks):
    """A TREC run: each task ranks its relevant passage at the given rank (behind fillers)."""
    lines = []
    for (qid, rel), rank in zip(RELEVANT, ranks, strict=True):
        docs = [f"x{i}" for i in range(rank - 1)] + [rel]
        lines += [f"{qid} Q0 {d} {i + 1} {10 - i} r" for i, d in enumerate(docs)]
    return write(path, "\n".join(lines) + "\n")


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "mtrag"
    write(root / "corpus.jsonl", '{"_id": "d1", "title": "", "text": "x"}\n')
    write(root / "mtrag-un" / "reference.jsonl", TASKS)
    write(root / "mtrag-un" / "qrels" / "clapnq.tsv", QRELS)
    return root


def test_seed_groups_mean_sd_and_paired_test(data, tmp_path):
    pytest.importorskip("ir_measures")
    seeds = load_benchmark("seeds")
    runs = tmp_path / "runs"
    run_file(runs / "a-s1.trec", [1, 1, 1])  # nDCG@3 1.0
    run_file(runs / "a-s2.trec", [1, 1, 2])
    run_file(runs / "b-s1.trec", [2, 2, 2])
    run_file(runs / "b-s2.trec", [3, 2, 2])
    run_file(runs / "bm25.trec", [1, 2, 3])
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--reference", "A"]
    argv += ["--group", f"A={runs}/a-s*.trec", "--group", f"B={runs}/b-s1.trec,{runs}/b-s2.trec"]
    argv += ["--run", f"BM25={runs}/bm25.trec"]
    assert seeds.main(argv) == 0
    result = json.loads((out / "seeds.json").read_text())
    a, b, bm25 = result["rows"]
    at2 = 1 / 1.5849625007211563  # nDCG of one relevant at rank 2: 1 / log2(3)
    assert [r["nDCG@3"] for r in a["per_run"]] == pytest.approx([1.0, (2 + at2) / 3])
    assert a["mean"]["nDCG@3"] == pytest.approx((1.0 + (2 + at2) / 3) / 2)
    assert a["sd"]["nDCG@3"] == pytest.approx(statistics.stdev([1.0, (2 + at2) / 3]))
    assert b["n"] == 2 and bm25["n"] == 1 and bm25["sd"]["nDCG@3"] == 0.0
    test = b["vs_reference"]["nDCG@3"]
    assert test["diff"] == pytest.approx(b["mean"]["nDCG@3"] - a["mean"]["nDCG@3"])
    assert test["num_queries"] == 3 and 0.0 <= test["randomization_p"] <= 1.0
    assert "vs_reference" not in a
    md = (out / "seeds.md").read_text()
    assert "| A | 2 | " in md and "reference" in md and "| BM25 | 1 | " in md
    assert (out / "seeds.png").read_bytes()[:4] == b"\x89PNG"

    # only the chosen conversations are scored
    held = write(tmp_path / "held.txt", "cB\n")
    assert seeds.main([*argv, "--eval-conversations", str(held)]) == 0
    again = json.loads((out / "seeds.json").read_text())
    assert again["queries_evaluated"] == 1
    assert again["rows"][0]["mean"]["nDCG@3"] == pytest.approx((1.0 + at2) / 2)


def test_bad_specs_are_clear_errors(data, tmp_path):
    seeds = load_benchmark("seeds")
    with pytest.raises(FileNotFoundError, match="no run file matches"):
        seeds.main(["--data", str(data), "--group", f"A={tmp_path}/none-*.trec"])
    with pytest.raises(ValueError, match="expected LABEL=FILES"):
        seeds.main(["--data", str(data), "--group", "A"])
    run = run_file(tmp_path / "r.trec", [1, 1, 1])
    with pytest.raises(ValueError, match="--reference 'C'"):
        seeds.main(["--data", str(data), "--group", f"A={run}", "--reference", "C"])


def test_a_run_lacking_evaluated_tasks_is_warned_and_counted(data, tmp_path, capsys):
    pytest.importorskip("ir_measures")
    seeds = load_benchmark("seeds")
    full = run_file(tmp_path / "full.trec", [1, 1, 1])
    part = write(tmp_path / "part.trec", "cA<::>1 Q0 d1 1 10 r\n")  # an interrupted search
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--group", f"full={full}"]
    assert seeds.main([*argv, "--group", f"part={part}"]) == 0
    assert f"warning: {part} lacks 2 of the 3 evaluated tasks" in capsys.readouterr().err
    result = json.loads((out / "seeds.json").read_text())
    assert [r["num_missing_from_run"] for r in result["rows"]] == [[0], [2]]
    assert result["num_missing_from_run"] == 2
    assert result["machine"]["cpu_model"] is not None and result["machine"]["cpu_count"]
    md = (out / "seeds.md").read_text()
    assert "Runs lacking evaluated tasks (scored 0 on them): 2" in md and "Machine: " in md
