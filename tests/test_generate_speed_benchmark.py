"""benchmarks/generate_speed.py at a tiny size: a tiny Llama, three MTRAG-like tasks."""

from __future__ import annotations

import json

from test_benchmarks import load_benchmark


def _task(conv: str, turn: int, question: str, contexts: list[str]) -> dict:
    history = [{"speaker": "user", "text": "what is a jaguar?"}]
    history += [{"speaker": "agent", "text": "a big cat of the americas."}] if turn > 1 else []
    return {
        "conversation_id": conv,
        "task_id": f"{conv}<::>{turn}",
        "turn": str(turn),
        "input": [*history[: 2 * (turn - 1)], {"speaker": "user", "text": question}],
        "targets": [{"text": "an answer"}],
        "contexts": [{"document_id": f"{conv}-{i}", "text": t} for i, t in enumerate(contexts)],
        "Collection": "mt-rag-clapnq-elser-512-100-20240503",
    }


def test_both_paths_are_timed_and_float32_replies_are_identical(tmp_path, tiny_llama_dir):
    tasks = [
        _task("a", 1, "where do jaguars live?", ["jaguars live in the rainforest"]),
        _task("b", 2, "what do they eat?", ["jaguars eat deer", "and capybaras " * 12]),
        _task("c", 1, "how do i reset my password?", ["open settings and choose reset " * 5]),
        _task("d", 1, "no passages here", []),  # left out: no reference passages
    ]
    data = tmp_path / "mtrag" / "mtrag-un"
    data.mkdir(parents=True)
    (data / "reference.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    out = tmp_path / "bench"
    bench = load_benchmark("generate_speed")
    argv = ["--model", str(tiny_llama_dir), "--data", str(data.parent), "--out", str(out)]
    argv += ["--dtype", "float32", "--batch-size", "3", "--batches", "1", "--rounds", "1"]
    assert bench.main([*argv, "--max-new-tokens", "4"]) == 0

    result = json.loads((out / "generate_speed.json").read_text())
    measured = result["measured"]
    assert set(measured["paths"]) == {"padded", "prefilled"}
    assert all(p["median_s_per_batch"] > 0 for p in measured["paths"].values())
    assert measured["ratio_median"] > 0
    assert (measured["rows"], measured["identical_rows"]) == (3, 3)  # float32: token for token
    assert sorted(result["task_ids"]) == ["a<::>1", "b<::>2", "c<::>1"]
    assert result["prompt_tokens"]["min"] < result["prompt_tokens"]["max"]  # lengths vary
    assert result["settings"]["max_new_tokens"] == 4 and result["dtype"] == "float32"
    assert "cpu_flags" in result["machine"] and result["machine"]["cpu_model"] is not None
    table = (out / "generate_speed.md").read_text()
    assert "| padded |" in table and "| prefilled |" in table and "3/3" in table
