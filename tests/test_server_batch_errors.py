"""One bad request must not fail the requests batched with it: the batcher retries a failed batch
item by item, a session the model refuses is a 422 naming the field, and a long system message is
cut, not refused (a tiny random ChatRetriever behind the app)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_helpers import build_fake_index, make_app

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
from chatretriever.apps.server.batcher import DynamicBatcher  # noqa: E402
from chatretriever.apps.server.engine import SearchItem  # noqa: E402
from chatretriever.types import Session  # noqa: E402

GOOD = [{"role": "user", "content": "what do jaguars eat?"}]
LONG_SYSTEM = [{"role": "system", "content": "You are a helpful assistant. " * 20}, *GOOD]
# a whole batch waits for its second request: both always share one forward
TOGETHER = dict(max_batch=2, max_wait_ms=10_000.0)


def _retriever_app(model_dir, root, max_session_len: int):
    from chatretriever import ChatRetriever
    from chatretriever.config import LoraSettings, RetrieverConfig

    config = RetrieverConfig(dtype="fp32", max_session_len=max_session_len)
    r = ChatRetriever.from_pretrained(
        model_dir, config=config, lora=LoraSettings(enabled=False), device="cpu"
    )
    index_dir, _ = build_fake_index(root, r)
    return make_app(index_dir, r, model=r.name, **TOGETHER)


@pytest.fixture(scope="module")
def app64(tiny_llama_dir, tmp_path_factory):
    return _retriever_app(tiny_llama_dir, tmp_path_factory.mktemp("b64"), 64)


@pytest.fixture(scope="module")
def app16(tiny_llama_dir, tmp_path_factory):
    """16 tokens hold the tiny template's bare session (7 + 3 EMB) but not one with a system
    message (17 + 3): a session with one is refused by the template however it is cut."""
    return _retriever_app(tiny_llama_dir, tmp_path_factory.mktemp("b16"), 16)


def _together(app, path: str, bodies: list[dict]) -> list[httpx.Response]:
    """The bodies posted at once (one event loop), so that they share a batch."""

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await asyncio.gather(*(c.post(path, json=b) for b in bodies))

    return asyncio.run(run())


def _same_hits(response: httpx.Response, app, messages: list[dict]) -> None:
    """The response's hits are those of its session searched alone (to padding's rounding)."""
    session = Session.from_messages("alone", messages)
    (alone,) = app.state.engine.search_batch([SearchItem(session, k=2)])
    got = response.json()["data"]
    assert [h["id"] for h in got] == [h.doc_id for h in alone]
    assert [h["score"] for h in got] == pytest.approx([h.score for h in alone], abs=1e-5)


def test_a_long_system_message_shares_a_forward_and_both_succeed(app64):
    good, bad = {"messages": GOOD, "k": 2}, {"messages": LONG_SYSTEM, "k": 2}
    before = app64.state.batchers.search.stats.batches
    r_good, r_bad = _together(app64, "/v1/search", [good, bad])
    assert (r_good.status_code, r_bad.status_code) == (200, 200), r_bad.text
    stats = app64.state.batchers.search.stats
    assert stats.batches == before + 1 and stats.largest == 2  # one forward for both
    assert len(r_bad.json()["data"]) == 2
    _same_hits(r_good, app64, GOOD)


def test_a_refused_session_is_a_422_for_its_request_only(app16):
    good, bad = {"messages": GOOD, "k": 2}, {"messages": LONG_SYSTEM, "k": 2}
    before = app16.state.batchers.search.stats.batches
    r_good, r_bad = _together(app16, "/v1/search", [good, bad])
    assert app16.state.batchers.search.stats.batches == before + 1  # they shared the batch
    assert r_good.status_code == 200, r_good.text
    _same_hits(r_good, app16, GOOD)
    assert r_bad.status_code == 422, r_bad.text
    err = r_bad.json()["error"]
    assert err["param"] == "messages" and err["type"] == "invalid_request_error"
    assert err["message"].startswith("messages: the model cannot encode this session: ")
    assert "max_session_len=16 leaves no room for the question" in err["message"]


def test_a_refused_embeddings_session_is_a_422_naming_input(app16):
    model = app16.state.settings.model
    before = app16.state.batchers.sessions.stats.batches
    r_bad, r_good = _together(
        app16,
        "/v1/embeddings",
        [{"input": [LONG_SYSTEM], "model": model}, {"input": [GOOD], "model": model}],
    )
    assert app16.state.batchers.sessions.stats.batches == before + 1
    assert r_good.status_code == 200 and len(r_good.json()["data"]) == 1
    assert r_bad.status_code == 422, r_bad.text
    err = r_bad.json()["error"]
    assert err["param"] == "input" and "max_session_len=16" in err["message"]


def test_the_batcher_retries_a_failed_batch_item_by_item():
    calls: list[list[str]] = []

    def process(items: list[str]) -> list[str]:
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [x.upper() for x in items]

    async def run():
        b = DynamicBatcher(process, ThreadPoolExecutor(1), max_batch=3, max_wait_ms=50)
        mixed = await asyncio.gather(
            b.submit("a"), b.submit("bad"), b.submit("c"), return_exceptions=True
        )
        alone = await asyncio.gather(b.submit("bad"), return_exceptions=True)
        await b.stop()
        return mixed, alone, b.stats

    mixed, alone, stats = asyncio.run(run())
    assert mixed[0] == "A" and mixed[2] == "C"
    assert isinstance(mixed[1], ValueError) and str(mixed[1]) == "bad item"
    assert isinstance(alone[0], ValueError)
    # the batch, then each of its items once; a lone item that fails is not tried again
    assert calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"], ["bad"]]
    assert (stats.batches, stats.items, stats.largest) == (2, 4, 3)
