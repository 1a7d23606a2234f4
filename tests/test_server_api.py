"""The HTTP API with FastAPI's TestClient over a fake-encoder index: search, OpenAI-compatible
embeddings, auth, limits, every error path, batching, and the `serve` command's checks."""

from __future__ import annotations

import asyncio
import base64
import threading
import time

import httpx
import numpy as np
import pytest
from fakes import HashEncoder
from server_helpers import AUTH, CORPUS, KEY, OTHER_KEY, build_fake_index, make_app, tree_state

from chatretriever.apps.registry import register_encoder, unregister_encoder
from chatretriever.cli import main
from chatretriever.errors import DataFormatError
from chatretriever.types import Passage

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from chatretriever.apps.server import schemas  # noqa: E402
from chatretriever.apps.server.auth import (  # noqa: E402
    ENV_VAR,
    ApiKeyChecker,
    check_auth_settings,
    load_api_keys,
)

JAGUAR = [{"role": "user", "content": "tell me about jaguars"}]
FOLLOW_UP = [
    *JAGUAR,
    {"role": "assistant", "content": "they are big cats"},
    {"role": "user", "content": "what do they eat"},
]


class RecordingEncoder(HashEncoder):
    """Remembers how many sessions each `encode_sessions` call got; can be slow."""

    def __init__(self, delay: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.delay = delay
        self.calls: list[int] = []
        self.threads: set[str] = set()

    def encode_sessions(self, sessions, batch_size=16, show_progress=False):
        self.calls.append(len(sessions))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        return super().encode_sessions(sessions, batch_size, show_progress)


@pytest.fixture
def built(tmp_path):
    return build_fake_index(tmp_path, RecordingEncoder())


@pytest.fixture
def client(built):
    index_dir, encoder = built
    with TestClient(make_app(index_dir, encoder, api_keys=(KEY, OTHER_KEY))) as c:
        yield c


def _search(client, messages, headers=AUTH, **extra):
    return client.post("/v1/search", json={"messages": messages, **extra}, headers=headers)


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]


# ---------------------------------------------------------------- search


def test_search_ranks_the_whole_conversation(client, built):
    r = _search(client, FOLLOW_UP, k=2)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "search.result" and body["model"] == "fake:"
    assert {h["id"] for h in body["data"]} & {"diet", "range"}
    top = body["data"][0]
    passage = next(p for p in CORPUS if p["_id"] == top["id"])
    assert top["rank"] == 1 and top["title"] == passage["title"] and top["text"] == passage["text"]
    assert body["data"][0]["score"] >= body["data"][1]["score"]
    # the same ranking as encoding the session and searching the index directly
    index_dir, encoder = built
    direct = HashEncoder().encode_sessions([FOLLOW_UP])
    from chatretriever.retrieval.corpus_index import CorpusIndex

    (expected,) = CorpusIndex.load(index_dir).index.search(direct, 2)
    assert [(h["id"], pytest.approx(h["score"], abs=1e-6)) for h in body["data"]] == expected


def test_openai_messages_with_names_and_text_parts_search_as_plain_ones(client):
    """Messages forwarded from an OpenAI client as they are: a `name` is not read, a list of
    text parts is its text joined by newlines."""
    plain = [{"role": "user", "content": "tell me about jaguars\nwhat do they eat"}]
    openai = [{"role": "user", "name": "ana", "content": [
        {"type": "text", "text": "tell me about jaguars"},
        {"type": "text", "text": "what do they eat"},
    ]}]  # fmt: skip
    want, got = _search(client, plain, k=3), _search(client, openai, k=3)
    assert got.status_code == want.status_code == 200
    assert got.json()["data"] == want.json()["data"]


def test_search_k_defaults_and_is_capped_by_the_index(client):
    assert len(_search(client, JAGUAR).json()["data"]) == 6  # default k 10, 6 passages
    assert len(_search(client, JAGUAR, k=1).json()["data"]) == 1


def test_hybrid_without_a_bm25_side_is_a_clear_422(client):
    err = _error(_search(client, JAGUAR, hybrid=True), 422)
    assert err["param"] == "hybrid" and "BM25" in err["message"]


# ---------------------------------------------------------------- embeddings (OpenAI shape)


def test_embeddings_match_the_openai_schema_and_the_encoder(client):
    from openai.types import CreateEmbeddingResponse

    texts = ["jaguars eat deer", "owls hunt mice"]
    r = client.post("/v1/embeddings", json={"input": texts, "model": "fake:"}, headers=AUTH)
    assert r.status_code == 200
    parsed = CreateEmbeddingResponse.model_validate(r.json())  # the SDK's documented schema
    assert parsed.object == "list" and parsed.model == "fake:"
    assert [d.index for d in parsed.data] == [0, 1]
    assert parsed.usage.prompt_tokens == 6 == parsed.usage.total_tokens
    expected = HashEncoder().encode_passages(
        [Passage(id=str(i), text=t) for i, t in enumerate(texts)]
    )
    np.testing.assert_allclose([d.embedding for d in parsed.data], expected, atol=1e-7)
    # a single string is one row; base64 is little-endian float32 of the same numbers
    r64 = client.post(
        "/v1/embeddings",
        json={"input": texts[0], "model": "fake:", "encoding_format": "base64"},
        headers=AUTH,
    )
    (row,) = r64.json()["data"]
    decoded = np.frombuffer(base64.b64decode(row["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, expected[0])


def test_embeddings_of_sessions(client):
    one = {"input": FOLLOW_UP, "model": "fake:"}
    many = {"input": [JAGUAR, FOLLOW_UP], "model": "fake:"}
    r1 = client.post("/v1/embeddings", json=one, headers=AUTH).json()
    r2 = client.post("/v1/embeddings", json=many, headers=AUTH).json()
    expected = HashEncoder().encode_sessions([JAGUAR, FOLLOW_UP])
    assert len(r1["data"]) == 1 and len(r2["data"]) == 2
    np.testing.assert_allclose(r1["data"][0]["embedding"], expected[1], atol=1e-7)
    np.testing.assert_allclose([d["embedding"] for d in r2["data"]], expected, atol=1e-7)


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"input": "x", "model": "other"}, 404, "model", "not served"),
        ({"input": "x", "model": "fake:", "dimensions": 3}, 422, "dimensions", "64"),
        ({"input": [], "model": "fake:"}, 422, "input", "empty"),
        ({"input": ["x"] * 257, "model": "fake:"}, 422, "input", "at most 256"),
        ({"input": [1, 2, 3], "model": "fake:"}, 422, "input", "token arrays are not supported"),
        ({"input": [[1, 2], [3]], "model": "fake:"}, 422, "input", "check_embedding_ctx_length"),
        ({"input": "x", "model": "fake:", "encoding_format": "int8"}, 422, None, "encoding_format"),
        ({"input": "x"}, 422, "model", "Field required"),
        ({"input": "x", "model": "fake:", "extra": 1}, 422, None, "extra"),
        ({"input": [JAGUAR, [{"role": "assistant", "content": "x"}]], "model": "fake:"}, 422,
         "input", "input[1]: the last message"),
        ({"input": "x" * 16_001, "model": "fake:"}, 422, "input", "input: at most 16000 chara"),
        ({"input": ["x", "y" * 16_001], "model": "fake:"}, 422, "input", "input[1]: at most 16000"),
        ({"input": "", "model": "fake:"}, 422, "input", "input: the text is empty"),
        ({"input": ["x", "  "], "model": "fake:"}, 422, "input", "input[1]: the text is empty"),
        ({"input": [[]], "model": "fake:"}, 422, "input", "input[0]: a session holds 1 to 1024"),
    ],
)  # fmt: skip
def test_embeddings_bad_requests(client, body, status, param, words):
    err = _error(client.post("/v1/embeddings", json=body, headers=AUTH), status)
    assert words in err["message"] and not err["message"].startswith("body")
    if param:
        assert err["param"] == param


def test_models_and_health(client):
    models = client.get("/v1/models", headers=AUTH).json()
    assert models == {
        "object": "list",
        "data": [{"id": "fake:", "object": "model", "created": 0, "owned_by": "chatretriever"}],
    }
    health = client.get("/healthz").json()  # no key needed
    assert health["status"] == "ok" and health["passages"] == 6 and health["dim"] == 64
    assert health["auth"] is True and health["incremental"] is False


# ---------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key-0123456789abcdef"},
        {"Authorization": f"Bearer {KEY[:-1]}"},  # a prefix of a real key
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": KEY},
        {"Authorization": "Bearer"},
    ],
)
def test_a_wrong_or_missing_key_is_one_plain_401(client, headers):
    for method, path, body in [
        ("POST", "/v1/search", {"messages": JAGUAR}),
        ("POST", "/v1/embeddings", {"input": "x", "model": "fake:"}),
        ("GET", "/v1/models", None),
        ("DELETE", "/v1/conversations/c1", None),
    ]:
        r = client.request(method, path, json=body, headers=headers)
        err = _error(r, 401)
        assert err == {
            "message": "invalid or missing API key (Authorization: Bearer KEY)",
            "type": "authentication_error",
            "param": None,
            "code": None,
        }
        assert r.headers["www-authenticate"] == "Bearer"


def test_every_key_works_and_the_scheme_is_case_insensitive(client):
    for header in (f"Bearer {KEY}", f"bearer {OTHER_KEY}", f"BEARER  {KEY}"):
        assert _search(client, JAGUAR, headers={"Authorization": header}).status_code == 200


def test_no_keys_means_no_check(built):
    index_dir, encoder = built
    with TestClient(make_app(index_dir, encoder)) as c:
        assert _search(c, JAGUAR, headers={}).status_code == 200
        assert c.get("/healthz").json()["auth"] is False


def test_checker_compares_digests_of_every_key():
    checker = ApiKeyChecker([KEY, OTHER_KEY])
    a, b = checker.client_id(f"Bearer {KEY}"), checker.client_id(f"Bearer {OTHER_KEY}")
    assert a and b and a != b and len(a) == 12 and KEY not in a
    assert checker.client_id(None) is None and checker.client_id("") is None
    assert ApiKeyChecker([]).client_id(None) == "anonymous"


def test_keys_from_env_and_file(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text(f"# team keys\n\n{KEY}  # the web page\n  {OTHER_KEY}  \n{KEY}\n")
    env = {ENV_VAR: f" {OTHER_KEY}, ,third-key-0123456789abcdef"}
    assert load_api_keys(f, env) == [OTHER_KEY, "third-key-0123456789abcdef", KEY]
    assert load_api_keys(None, {}) == []
    f.write_text(f"{KEY}\nshort # too short\n")
    with pytest.raises(DataFormatError, match=r"keys.txt:2: .*at least 16") as e:
        load_api_keys(f, {})
    assert e.value.line == 2
    with pytest.raises(ValueError, match=f"{ENV_VAR} item 2"):
        load_api_keys(None, {ENV_VAR: f"{KEY},has space in it 0123456789"})


def test_no_auth_only_on_loopback():
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        check_auth_settings([], no_auth=True, host=host)
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.com"):
        with pytest.raises(ValueError, match="only allowed on a loopback host"):
            check_auth_settings([], no_auth=True, host=host)
    with pytest.raises(ValueError, match="no API keys"):
        check_auth_settings([], no_auth=False, host="127.0.0.1")
    check_auth_settings([KEY], no_auth=False, host="0.0.0.0")


# ---------------------------------------------------------------- limits and bad input


def test_body_size_limit_is_a_413_before_parsing(built):
    index_dir, encoder = built
    with TestClient(make_app(index_dir, encoder, api_keys=(KEY,), max_body_bytes=2000)) as c:
        big = {"messages": [{"role": "user", "content": "x" * 3000}]}
        err = _error(c.post("/v1/search", json=big, headers=AUTH), 413)
        assert "over the limit of 2000 bytes" in err["message"]

        def chunks():  # no Content-Length: counted while reading
            for _ in range(10):
                yield b" " * 500

        err = _error(c.post("/v1/search", content=chunks(), headers=AUTH), 413)
        assert "2000" in err["message"]
        assert _search(c, JAGUAR).status_code == 200  # still serving
        err = _error(c.post("/v1/search", headers={**AUTH, "Content-Length": "x1"}), 400)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"messages": JAGUAR * 1025}, "messages", "at most 1024"),
        ({"messages": [{"role": "user", "content": "x" * 16_001}]}, "messages.0.content", "16000"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": JAGUAR, "k": 0}, "k", "greater than or equal to 1"),
        ({"messages": JAGUAR, "k": 101}, "k", "less than or equal to 100"),
        ({"messages": JAGUAR, "k": "ten"}, "k", "integer"),
        ({"messages": JAGUAR, "k": "3"}, "k", "expected a JSON integer"),
        ({"messages": JAGUAR, "k": True}, "k", "expected a JSON integer"),
        ({"messages": JAGUAR, "hybrid": "yes"}, "hybrid", "valid boolean"),
        ({"messages": [{"role": "user", "content": "   "}]}, "messages", "current question"),
        ({"messages": JAGUAR, "mesages": 1}, "mesages", "Extra inputs"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "'user'"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content", "string"),
        ({"messages": [{"role": "user"}]}, "messages.0.content", "Field required"),
        ({"messages": [{"role": "user", "content": "x", "nme": "a"}]}, "messages.0.nme", "Extra"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content",
            "content[0]: only text parts can be read, got 'image_url'",
        ),
        ({"messages": [{"role": "user", "content": "x", "name": 3}]}, "messages.0.name", "string"),
        ({"messages": [*JAGUAR, {"role": "assistant", "content": "x"}]}, "messages", "messages: "),
        ({"messages": JAGUAR, "conversation_id": "a b"}, "conversation_id", "pattern"),
        ({"messages": JAGUAR, "conversation_id": "x" * 129}, "conversation_id", "128"),
        ({"messages": "hello"}, "messages", "list"),
        ([1, 2], "body", "dictionary"),
    ],
)
def test_search_bad_requests_say_what_is_wrong(client, body, param, words):
    err = _error(client.post("/v1/search", json=body, headers=AUTH), 422)
    assert err["param"] == param and words in err["message"], err
    assert not err["message"].startswith("body: ") or param == "body"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{bad json", "invalid JSON"),
        (b"", "Field required"),
        (b'{"messages": [}', "invalid JSON"),
        (b"\xff\xfe", "invalid JSON"),
    ],
)
def test_malformed_json_is_a_422(client, content, words):
    headers = {**AUTH, "Content-Type": "application/json"}
    r = client.post("/v1/search", content=content, headers=headers)
    assert words in _error(r, 422)["message"] and "Traceback" not in r.text


def test_deeply_nested_json_is_a_422(client):
    headers = {**AUTH, "Content-Type": "application/json"}
    r = client.post("/v1/search", content=b"[" * 200_000, headers=headers)
    err = _error(r, 422)
    assert err["param"] == "body" and "invalid JSON" in err["message"]


def test_unknown_routes_and_methods_answer_json(client):
    assert _error(client.get("/v1/nothing", headers=AUTH), 404)["message"] == "Not Found"
    assert _error(client.get("/v1/search", headers=AUTH), 405)["type"] == "invalid_request_error"
    err = _error(client.delete("/v1/conversations/" + "x" * 200, headers=AUTH), 422)
    assert "128" in err["message"] and err["param"] == "conversation_id"


# ---------------------------------------------------------------- batching and the model thread


def _concurrent_searches(app, n: int, messages_of) -> list[httpx.Response]:
    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            requests = [
                c.post("/v1/search", json={"messages": messages_of(i), "k": 3}, headers=AUTH)
                for i in range(n)
            ]
            return await asyncio.gather(*requests)

    return asyncio.run(run())


def test_concurrent_searches_share_forwards(built):
    index_dir, encoder = built
    app = make_app(index_dir, encoder, api_keys=(KEY,), max_batch=8, max_wait_ms=50)
    texts = ["jaguars", "pasta sauce", "owls at night", "running shoes"]
    responses = _concurrent_searches(app, 16, lambda i: [{"role": "user", "content": texts[i % 4]}])
    assert all(r.status_code == 200 for r in responses)
    assert sum(encoder.calls) == 16 and max(encoder.calls) == 8 and len(encoder.calls) <= 4
    assert encoder.threads and all(t.startswith("chatretriever-model") for t in encoder.threads)
    # each answer is the one its own query gets alone
    with TestClient(app) as c:
        for i, r in enumerate(responses):
            alone = _search(c, [{"role": "user", "content": texts[i % 4]}], k=3).json()
            assert r.json()["data"] == alone["data"]
    assert c.app.state.batchers.counters()["items"] >= 20


def test_max_batch_one_is_one_request_per_forward(built):
    index_dir, encoder = built
    app = make_app(index_dir, encoder, api_keys=(KEY,), max_batch=1, max_wait_ms=50)
    _concurrent_searches(app, 6, lambda i: JAGUAR)
    assert encoder.calls == [1] * 6


def test_model_work_never_blocks_the_event_loop(tmp_path):
    index_dir, encoder = build_fake_index(tmp_path, RecordingEncoder(delay=0.0))
    app = make_app(index_dir, encoder, api_keys=(KEY,))
    encoder.delay = 1.0

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            slow = asyncio.create_task(
                c.post("/v1/search", json={"messages": JAGUAR}, headers=AUTH)
            )
            await asyncio.sleep(0.1)  # the slow forward is running on the model thread
            start = time.monotonic()
            health = await c.get("/healthz")
            quick = time.monotonic() - start
            return (await slow).status_code, health.status_code, quick

    slow_status, health_status, quick = asyncio.run(run())
    assert slow_status == 200 and health_status == 200 and quick < 0.5


def test_a_failing_forward_is_a_500_without_details_and_the_server_goes_on(built, caplog):
    index_dir, encoder = built
    with TestClient(
        make_app(index_dir, encoder, api_keys=(KEY,)), raise_server_exceptions=False
    ) as c:
        original = encoder.encode_sessions
        encoder.encode_sessions = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("secret"))
        err = _error(_search(c, JAGUAR), 500)
        assert err["message"] == "internal error (see the server log)" and "secret" not in err
        assert "secret" in caplog.text  # logged on the server side
        encoder.encode_sessions = original
        assert _search(c, JAGUAR).status_code == 200


def test_a_full_queue_is_a_503(built):
    index_dir, encoder = built
    app = make_app(index_dir, encoder, api_keys=(KEY,), max_queue=4)
    with TestClient(app) as c:
        body = {"input": ["x"] * 5, "model": "fake:"}
        err = _error(c.post("/v1/embeddings", json=body, headers=AUTH), 503)
        assert "busy" in err["message"]


# ---------------------------------------------------------------- incremental sessions


class FakeIncremental:
    """Stands in for `IncrementalSessionEncoder`: full encodes, recording the cache keys."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.keys: list[str] = []
        self.resets: list[str] = []

    @property
    def stats(self):
        return {"hits": 0, "conversations": len(set(self.keys) - set(self.resets))}

    def encode(self, conversation_id, messages):
        self.keys.append(conversation_id)
        return self.encoder.encode_sessions([messages])[0]

    def reset(self, conversation_id):
        self.resets.append(conversation_id)


def test_conversation_ids_use_the_incremental_encoder_per_client(built, monkeypatch):
    from chatretriever.apps.server import app as app_module

    index_dir, encoder = built
    fake = FakeIncremental(encoder)
    monkeypatch.setattr(app_module, "make_incremental", lambda enc, max_bytes: fake)
    with TestClient(make_app(index_dir, encoder, api_keys=(KEY, OTHER_KEY))) as c:
        plain = _search(c, FOLLOW_UP, k=3).json()["data"]
        first = _search(c, FOLLOW_UP, k=3, conversation_id="c1").json()
        other = _search(c, FOLLOW_UP, k=3, conversation_id="c1", headers={
            "Authorization": f"Bearer {OTHER_KEY}"}).json()  # fmt: skip
        assert first["data"] == plain == other["data"] and first["conversation_id"] == "c1"
        assert len(fake.keys) == 2 and fake.keys[0] != fake.keys[1]  # clients kept apart
        assert all(k.endswith("/c1") for k in fake.keys)
        assert c.get("/healthz").json()["incremental_stats"]["conversations"] == 2
        assert c.delete("/v1/conversations/c1", headers=AUTH).status_code == 204
        assert fake.resets == [fake.keys[0]]
        health = c.get("/healthz").json()
        assert health["incremental"] is True
        assert health["incremental_stats"]["conversations"] == 1  # the counters follow a DELETE


def test_other_encoders_get_no_incremental_encoder():
    from chatretriever.apps.server.engine import make_incremental

    assert make_incremental(HashEncoder(), 1 << 20) is None


# ---------------------------------------------------------------- the page and the index dir


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="turn-input"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from outside
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "innerHTML" not in js.text and "textContent" in js.text
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/../schemas.py").status_code == 404


def test_the_server_never_writes_into_the_index(tmp_path):
    index_dir, encoder = build_fake_index(tmp_path, RecordingEncoder())
    before = tree_state(index_dir)
    with TestClient(make_app(index_dir, encoder, api_keys=(KEY,))) as c:
        _search(c, FOLLOW_UP, conversation_id="c1")
        c.post("/v1/embeddings", json={"input": ["x"], "model": "fake:"}, headers=AUTH)
        c.delete("/v1/conversations/c1", headers=AUTH)
    assert tree_state(index_dir) == before


def test_a_long_conversation_is_searched_not_refused(client):
    """More turns than a model reads (a conversation of 301 messages) is a 200: the template
    drops the oldest exchanges; only the message limit itself is refused."""
    turns = []
    for i in range(150):
        turns += [{"role": "user", "content": f"question {i}"},
                  {"role": "assistant", "content": f"answer {i}"}]  # fmt: skip
    turns.append({"role": "user", "content": "tell me about jaguars"})
    assert _search(client, turns).status_code == 200


def test_openapi_documents_the_limits(client):
    spec = client.get("/openapi.json").json()
    search = spec["components"]["schemas"]["SearchRequest"]
    assert search["additionalProperties"] is False
    assert search["properties"]["k"]["maximum"] == schemas.MAX_K
    assert search["properties"]["messages"]["maxItems"] == schemas.MAX_MESSAGES
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


# ---------------------------------------------------------------- the command


@pytest.fixture
def fake_model():
    register_encoder("fake", lambda rest: HashEncoder())
    yield
    unregister_encoder("fake")


def test_serve_refuses_unsafe_settings(built, fake_model, monkeypatch, capsys):
    index_dir, _ = built
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert main(["serve", "--index", str(index_dir)]) == 2
    assert "no API keys" in capsys.readouterr().err
    assert main(["serve", "--index", str(index_dir), "--no-auth", "--host", "0.0.0.0"]) == 2
    assert "loopback" in capsys.readouterr().err
    assert main(["serve", "--index", str(index_dir), "--no-auth", "--max-batch", "0"]) == 2
    import socket

    with socket.socket() as taken:  # another process listens there: refused before the model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        capsys.readouterr()
        assert main(["serve", "--index", str(index_dir), "--no-auth", "--port", port]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"cannot serve on 127.0.0.1:{port}" in err[0]


def test_serve_builds_the_app_and_runs_uvicorn(built, fake_model, monkeypatch, tmp_path, capsys):
    import uvicorn

    index_dir, _ = built
    seen = {}

    def fake_run(app, **kwargs):
        seen.update(kwargs)
        with TestClient(app) as c:
            seen["search"] = _search(c, FOLLOW_UP, k=1).json()["data"][0]["id"]
            seen["settings"] = app.state.settings

    monkeypatch.setattr(uvicorn, "run", fake_run)
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    monkeypatch.setenv(ENV_VAR, OTHER_KEY)
    argv = ["serve", "--index", str(index_dir), "--api-keys-file", str(keys), "--port", "8123"]
    assert main([*argv, "--max-batch", "4", "--max-wait-ms", "2"]) == 0
    assert (
        seen["host"] == "127.0.0.1" and seen["port"] == 8123 and seen["search"] in ("diet", "range")
    )
    assert seen["settings"].api_keys == (OTHER_KEY, KEY) and seen["settings"].max_batch == 4
    assert "6 passages, model fake:, 2 API key(s)" in capsys.readouterr().out


# ---------------------------------------------------------------- hybrid (an index with BM25)


def test_hybrid_search_fuses_the_index_bm25_side(tmp_path, fake_model, monkeypatch):
    """`index --bm25` then `serve`: "hybrid": true answers what `search_hybrid` gives."""
    import uvicorn
    from fixtures import jsonl, write
    from server_helpers import CORPUS

    from chatretriever.retrieval.baselines import BM25Retriever
    from chatretriever.retrieval.corpus_index import CorpusIndex
    from chatretriever.retrieval.fusion import FusionConfig
    from chatretriever.retrieval.search import search_hybrid
    from chatretriever.types import Session

    corpus = write(tmp_path / "corpus.jsonl", jsonl(CORPUS))
    out = tmp_path / "idx"
    assert main(["index", str(corpus), "--out", str(out), "--model", "fake:", "--bm25"]) == 0
    seen = {}

    def fake_run(app, **kwargs):
        with TestClient(app) as c:
            seen["health"] = c.get("/healthz").json()
            seen["hybrid"] = _search(c, FOLLOW_UP, k=3, hybrid=True).json()["data"]
            seen["dense"] = _search(c, FOLLOW_UP, k=3).json()["data"]

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setenv(ENV_VAR, KEY)
    assert main(["serve", "--index", str(out), "--hybrid", "rrf", "--rrf-k", "10"]) == 0
    assert seen["health"]["hybrid"] is True
    session = Session.from_messages("q", FOLLOW_UP)
    bm25 = BM25Retriever.load(out / "bm25")
    run = search_hybrid(
        HashEncoder(), CorpusIndex.load(out).index, bm25, [session], 3,
        FusionConfig("rrf", 10), sparse_formulation="last_turn", show_progress=False,
    )  # fmt: skip
    expected = [(d.doc_id, pytest.approx(d.score)) for d in run.ranked("q")]
    assert [(h["id"], h["score"]) for h in seen["hybrid"]] == expected
    assert seen["hybrid"] != seen["dense"]  # RRF scores, not inner products


def test_serve_hybrid_without_a_bm25_side_is_refused(built, fake_model, monkeypatch, capsys):
    index_dir, _ = built
    monkeypatch.setenv(ENV_VAR, KEY)
    assert main(["serve", "--index", str(index_dir), "--hybrid", "rrf"]) == 2
    assert "no BM25 side" in capsys.readouterr().err


# ---------------------------------------------------------------- the batcher on its own


def test_batcher_groups_items_and_a_bad_item_fails_alone():
    from concurrent.futures import ThreadPoolExecutor

    from chatretriever.apps.server.batcher import DynamicBatcher

    calls: list[list[int]] = []

    def process(items: list[int]) -> list[int]:
        calls.append(list(items))
        if -1 in items:
            return items[:-1]  # one result short: the batch fails, then -1 alone fails again
        return [x * 10 for x in items]

    async def run():
        b = DynamicBatcher(process, ThreadPoolExecutor(1), max_batch=4, max_wait_ms=30)
        first = await asyncio.gather(*(b.submit(i) for i in range(6)))
        bad = await asyncio.gather(b.submit(7), b.submit(-1), return_exceptions=True)
        after = await b.submit(3)
        await b.stop()
        return first, bad, after, b.stats

    first, bad, after, stats = asyncio.run(run())
    assert first == [0, 10, 20, 30, 40, 50] and calls[:2] == [[0, 1, 2, 3], [4, 5]]
    assert calls[2:] == [[7, -1], [7], [-1], [3]]  # the failed batch, then each item alone
    assert bad[0] == 70 and isinstance(bad[1], RuntimeError) and "0 results for 1" in str(bad[1])
    assert after == 30 and stats.batches == 4 and stats.items == 9 and stats.largest == 4
    with pytest.raises(ValueError):
        DynamicBatcher(process, None, max_batch=0)


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "jaguars \ud800 eat"}]},
        {"input": "lone \udc00", "model": "fake:"},
        {"input": ["fine", "lone \ud800"], "model": "fake:"},
    ],
)
def test_lone_surrogates_are_refused_before_any_tokenizer(client, body):
    """Valid JSON ("\\ud800") that no tokenizer takes: a 422, never a 500 in the model."""
    import json

    path = "/v1/search" if "messages" in body else "/v1/embeddings"
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as \ud800
    headers = {**AUTH, "Content-Type": "application/json"}
    err = _error(client.post(path, content=raw, headers=headers), 422)
    assert "unicode" in err["message"].lower() or "surrogate" in err["message"]


def test_the_openapi_schema_keeps_every_numeric_bound():
    """The JSON-integer validators must not hide the bounds from the schema clients read."""
    search = schemas.SearchRequest.model_json_schema()["properties"]["k"]
    assert (search["minimum"], search["maximum"]) == (1, schemas.MAX_K)
    dims = schemas.EmbeddingsRequest.model_json_schema()["properties"]["dimensions"]["anyOf"][0]
    assert dims == {"minimum": 1, "type": "integer"}
