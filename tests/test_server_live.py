"""`chatretriever serve` for real: a uvicorn process on a free 127.0.0.1 port, a tiny saved
ChatRetriever, the `openai` client and raw httpx against it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from importlib.util import find_spec
from pathlib import Path

import httpx
import numpy as np
import pytest
from fixtures import jsonl, write
from server_helpers import CORPUS, KEY, free_port

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {KEY}"}
TURNS = [
    "tell me about jaguars",
    "what do they eat",
    "and where do they live",
]
START_TIMEOUT = 120.0
INCREMENTAL = "chatretriever.methods.chatretriever.incremental"


@pytest.fixture(scope="module")
def retriever_and_index(tiny_llama_dir, tmp_path_factory):
    """A tiny saved ChatRetriever (fp32, the same numbers in and out of the server) and a corpus
    index built with it; the index records the saved directory as its model."""
    from chatretriever import ChatRetriever
    from chatretriever.config import LoraSettings, RetrieverConfig
    from chatretriever.retrieval.corpus_index import build_corpus_index

    root = tmp_path_factory.mktemp("live")
    config = RetrieverConfig(n_emb_tokens=2, dtype="fp32", max_session_len=128)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    fresh = ChatRetriever.from_pretrained(tiny_llama_dir, config=config, lora=lora, device="cpu")
    saved = fresh.save_pretrained(root / "retriever")
    retriever = ChatRetriever.from_pretrained(saved, device="cpu")
    corpus = write(root / "corpus.jsonl", jsonl(CORPUS))
    build_corpus_index(retriever, str(saved), corpus, root / "idx")
    return retriever, root / "idx"


def _wait_healthy(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("serve did not answer /healthz in time")


@pytest.fixture(scope="module")
def server(retriever_and_index, tmp_path_factory):
    """`python -m chatretriever serve` with an API key file; yields (base url, process)."""
    _, index_dir = retriever_and_index
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# test\n{KEY}\n")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("CHATRETRIEVER_API_KEYS", None)
    argv = [sys.executable, "-m", "chatretriever", "serve", "--index", str(index_dir)]
    argv += ["--port", str(port), "--api-keys-file", str(keys), "--max-wait-ms", "20"]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_openai_client_embeddings(server, retriever_and_index):
    openai = pytest.importorskip("openai")
    retriever, _ = retriever_and_index
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    model = client.models.list().data[0].id
    texts = ["jaguars eat deer", "owls hunt mice at night"]
    got = client.embeddings.create(model=model, input=texts)  # the client asks for base64
    assert [d.index for d in got.data] == [0, 1] and got.model == model
    expected = retriever.encode_passages(texts)
    np.testing.assert_allclose([d.embedding for d in got.data], expected, atol=1e-4)
    as_floats = client.embeddings.create(model=model, input=texts[0], encoding_format="float")
    np.testing.assert_allclose(as_floats.data[0].embedding, expected[0], atol=1e-4)
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="not-the-key-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid or missing API key"):
        wrong.embeddings.create(model=model, input="x")
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.embeddings.create(model="gpt-4o", input="x")


def test_conversation_turn_by_turn_equals_full_encodes(server, retriever_and_index):
    retriever, _ = retriever_and_index
    url, _ = server
    messages: list[dict[str, str]] = []
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
        for turn in TURNS:
            messages.append({"role": "user", "content": turn})
            body = {"messages": messages, "k": 3}
            cached = http.post("/v1/search", json={**body, "conversation_id": "live-1"}).json()
            plain = http.post("/v1/search", json=body).json()
            assert [h["id"] for h in cached["data"]] == [h["id"] for h in plain["data"]]
            np.testing.assert_allclose(
                [h["score"] for h in cached["data"]], [h["score"] for h in plain["data"]], atol=1e-4
            )
        # the scores are the retriever's own: the session embedding against the passages
        session = retriever.encode_sessions([messages])[0]
        top = plain["data"][0]
        passage = next(p for p in CORPUS if p["_id"] == top["id"])
        expected = float(
            retriever.encode_passages([passage["title"] + "\n" + passage["text"]])[0] @ session
        )
        assert top["score"] == pytest.approx(expected, abs=1e-4)
        health = http.get("/healthz").json()
        assert health["passages"] == len(CORPUS) and health["auth"] is True
        # with the incremental module present, a ChatRetriever server uses it: turns 2, 3 reuse
        assert health["incremental"] is (find_spec(INCREMENTAL) is not None)
        if health["incremental"]:
            stats = health["incremental_stats"]
            assert stats["hits"] >= 2 and stats["tokens_reused"] > 0, stats
        assert http.delete("/v1/conversations/live-1").status_code == 204
        # JSON the real tokenizer cannot take (a lone surrogate) is a 422, not a 500
        raw = b'{"messages": [{"role": "user", "content": "a \\ud800 b"}]}'
        bad = http.post("/v1/search", content=raw, headers={"Content-Type": "application/json"})
        assert bad.status_code == 422, bad.text


def test_concurrent_requests_are_batched(server):
    url, _ = server
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
        before = http.get("/healthz").json()
    statuses: list[int] = []

    def one(i: int) -> None:
        body = {"messages": [{"role": "user", "content": f"{TURNS[i % 3]} {i}"}], "k": 2}
        statuses.append(
            httpx.post(f"{url}/v1/search", json=body, headers=AUTH, timeout=60).status_code
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = httpx.get(f"{url}/healthz").json()
    assert statuses == [200] * 16
    assert after["items"] - before["items"] == 16
    assert after["batches"] - before["batches"] < 16  # some requests shared a forward


def test_banner_and_clean_shutdown(server):
    url, proc = server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 0
    out = proc.stdout.read()
    assert f"{len(CORPUS)} passages" in out and "1 API key(s)" in out and "/healthz" in out
    assert "Traceback" not in proc.stderr.read()


def test_serve_refuses_a_network_host_without_keys(retriever_and_index):
    _, index_dir = retriever_and_index
    env = {k: v for k, v in os.environ.items() if k != "CHATRETRIEVER_API_KEYS"}
    argv = [sys.executable, "-m", "chatretriever", "serve", "--index", str(index_dir)]
    done = subprocess.run(
        [*argv, "--host", "0.0.0.0", "--no-auth"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and "loopback" in done.stderr
    assert Path(index_dir).is_dir()


def test_load_benchmark_against_a_live_server(tmp_path):
    """benchmarks/serve_load.py --url: a bounded run against a fake-encoder server on loopback."""
    from server_helpers import build_fake_index, make_app, running_server
    from test_benchmarks import load_benchmark

    bench = load_benchmark("serve_load")
    index_dir, encoder = build_fake_index(tmp_path)
    out = tmp_path / "out"
    with running_server(make_app(index_dir, encoder, api_keys=(KEY,), max_batch=8)) as url:
        argv = ["--url", url, "--api-key", KEY, "--requests", "120", "--concurrency", "8"]
        assert bench.main([*argv, "--out", str(out)]) == 0
        with pytest.raises(SystemExit):
            bench.parse_args(["--url", "http://10.0.0.1:8000"])  # loopback only
    report = json.loads((out / "serve_load.json").read_text())
    (result,) = report["results"]
    assert result["requests"] == 120 and result["errors"] == 0 and result["throughput"] > 0
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert "| 120 | 8 | 0 |" in (out / "serve_load.md").read_text()
    # a wrong key: every request is an error, and the run still ends
    with running_server(make_app(index_dir, encoder, api_keys=(KEY,))) as url:
        latencies, errors, _, _, samples = asyncio.run(
            bench.run_load(url, bench.demo_payloads(3), 10, 4, 30, "wrong-key-0123456789abcdef")
        )
    assert errors == 10 and not latencies and "HTTP 401" in samples[0]


def test_load_benchmark_starts_and_compares_servers(retriever_and_index, tmp_path):
    """benchmarks/serve_load.py --index: one `serve` process per --max-batch, loaded in rounds."""
    from test_benchmarks import load_benchmark

    bench = load_benchmark("serve_load")
    _, index_dir = retriever_and_index
    out = tmp_path / "out"
    argv = ["--index", str(index_dir), "--requests", "24", "--concurrency", "6"]
    assert bench.main([*argv, "--configs", "6,1", "--rounds", "2", "--out", str(out)]) == 0
    report = json.loads((out / "serve_load.json").read_text())
    batched, single = report["results"]
    assert (batched["max_batch"], single["max_batch"]) == (6, 1)
    assert batched["requests"] == single["requests"] == 24
    assert batched["errors"] == single["errors"] == 0
    assert single["mean_batch"] == 1.0 and batched["mean_batch"] > 1.0
    assert len(batched["loadavg_1min"]) == 2 and report["speedup"] > 0
    assert "batcher / one request per forward" in (out / "serve_load.md").read_text()
