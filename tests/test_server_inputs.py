"""What the server says about requests of the wrong shape, type or encoding, and the `serve`
command's refusals of settings that cannot work (a fake-encoder index, FastAPI's TestClient)."""

from __future__ import annotations

import json

import pytest
from fakes import HashEncoder
from server_helpers import AUTH, KEY, build_fake_index, free_port, make_app

from chatretriever.apps.registry import register_encoder, unregister_encoder
from chatretriever.cli import main

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from chatretriever.apps.server.auth import ENV_VAR  # noqa: E402

JAGUAR = [{"role": "user", "content": "tell me about jaguars"}]
SHAPES = "a string, a list of strings, a list of chat messages or a list of such lists"
SEARCH = json.dumps({"messages": JAGUAR, "k": 1}).encode()


class NamingEncoder(HashEncoder):
    """Remembers the ids of the sessions it encoded (what the model's warnings name)."""

    def __init__(self) -> None:
        super().__init__()
        self.session_ids: list[str] = []

    def encode_sessions(self, sessions, batch_size=16, show_progress=False):
        self.session_ids.extend(s.id for s in sessions)
        return super().encode_sessions(sessions, batch_size, show_progress)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_fake_index(tmp_path_factory.mktemp("inputs"), NamingEncoder())


@pytest.fixture(scope="module")
def client(built):
    index_dir, encoder = built
    with TestClient(make_app(index_dir, encoder, api_keys=(KEY,))) as c:
        yield c


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---------------------------------------------------------------- embeddings `input`


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (["a", 5], "input[1]: expected a string, got a number (all items of input"),
        (["a", None], "input[1]: expected a string, got null"),
        (["a", ["b"]], "input[1]: expected a string, got an array"),
        ([JAGUAR[0], 5], "input[1]: expected a chat message (an object with role and content)"),
        ([JAGUAR, "x"], "input[1]: expected a list of chat messages, got a string"),
        (True, f"input: expected {SHAPES}, got a boolean"),
        ([True], "input[0]: expected a string or a chat message, got a boolean"),
        ([True, False], "input[0]: expected a string or a chat message, got a boolean"),
        (None, f"input: expected {SHAPES}, got null"),
        ({"a": 1}, f"input: expected {SHAPES}, got an object"),
        ([1.5], "input[0]: expected a string or a chat message, got a number"),
        ([None], "input[0]: expected a string or a chat message, got null"),
        ([[True]], "input[0][0]: Input should be a valid dictionary (a chat message)"),
        ([{"role": "robot", "content": "x"}], "input[0].role: Input should be"),
    ],
)
def test_embeddings_input_of_no_accepted_shape_is_one_plain_line(client, value, words):
    r = client.post("/v1/embeddings", json={"input": value, "model": "fake:"}, headers=AUTH)
    err = _error(r, 422)
    assert err["param"] == "input" and err["message"].startswith(words), err
    # one problem, not every branch of the union of shapes (pydantic's names stay inside)
    assert "; " not in err["message"] and "constrained-str" not in err["message"]
    assert "token arrays" not in err["message"]  # a boolean is no token id


def test_token_arrays_keep_their_hint_and_valid_inputs_pass(client):
    for value in (5, [1, 2], [[1, 2]]):
        body = {"input": value, "model": "fake:"}
        err = _error(client.post("/v1/embeddings", json=body, headers=AUTH), 422)
        assert err["param"] == "input" and "token arrays are not supported" in err["message"]
    for value in ("x", ["x", "y"], JAGUAR, [JAGUAR, JAGUAR]):
        body = {"input": value, "model": "fake:"}
        assert client.post("/v1/embeddings", json=body, headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        ("/v1/search", {"messages": [*JAGUAR, {"role": "assistant", "content": "x"}]},
         "messages", "messages: the last message must have role 'user' (the current question)"),
        ("/v1/search", {"messages": [{"role": "user", "content": " "}]},
         "messages", "messages: the current question (the last message) is empty"),
        ("/v1/embeddings", {"input": [], "model": "fake:"}, "input", "input: must not be empty"),
        ("/v1/embeddings", {"input": ["x", " "], "model": "fake:"},
         "input", "input[1]: the text is empty"),
        ("/v1/embeddings", {"input": ["x"] * 257, "model": "fake:"},
         "input", "input: at most 256 items per request, got 257"),
        ("/v1/embeddings", {"input": [JAGUAR, [{"role": "assistant", "content": "x"}]],
         "model": "fake:"}, "input",
         "input[1]: the last message must have role 'user' (the current question)"),
    ],
)  # fmt: skip
def test_request_level_rules_name_their_field_not_the_body(client, path, body, param, message):
    err = _error(client.post(path, json=body, headers=AUTH), 422)
    assert (err["param"], err["message"]) == (param, message)


# ---------------------------------------------------------------- the body's declared type


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ({}, "Content-Type must be application/json (none was sent"),
        ({"Content-Type": "application/x-www-form-urlencoded"},  # curl -d
         "Content-Type must be application/json (got 'application/x-www-form-urlencoded'"),
        ({"Content-Type": "text/plain"}, "with curl: -H 'Content-Type: application/json'"),
        ({"Content-Type": "application/json", "Content-Encoding": "gzip"},
         "Content-Encoding gzip is not supported"),
        ({"Content-Type": "application/json", "Content-Encoding": "br"},
         "Content-Encoding br is not supported"),
    ],
)  # fmt: skip
def test_a_body_that_is_not_plain_json_is_a_415(client, headers, words):
    for path in ("/v1/search", "/v1/embeddings"):
        err = _error(client.post(path, content=SEARCH, headers={**AUTH, **headers}), 415)
        assert words in err["message"] and err["type"] == "invalid_request_error"


def test_json_content_types_are_read(client):
    for content_type in (
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/vnd.api+json",
    ):
        headers = {**AUTH, "Content-Type": content_type, "Content-Encoding": "identity"}
        assert client.post("/v1/search", content=SEARCH, headers=headers).status_code == 200
    # other routes answer as they did: 405/404, not 415
    assert client.post("/", content=b"x", headers=AUTH).status_code == 405
    assert client.post("/v1/nothing", content=b"x", headers=AUTH).status_code == 404


# ---------------------------------------------------------------- conversation ids, HEAD


@pytest.mark.parametrize(
    ("segment", "conversation_id", "words"),
    [
        ("a%20b", "a b", "conversation_id: String should match pattern"),
        ("%C3%A9t%C3%A9", "été", "conversation_id: String should match pattern"),
        ("x" * 129, "x" * 129, "conversation_id: String should have at most 128 characters"),
    ],
)
def test_delete_applies_the_search_id_rules(client, segment, conversation_id, words):
    err = _error(client.delete(f"/v1/conversations/{segment}", headers=AUTH), 422)
    assert err["param"] == "conversation_id" and err["message"].startswith(words), err
    body = {"messages": JAGUAR, "conversation_id": conversation_id}
    assert _error(client.post("/v1/search", json=body, headers=AUTH), 422) == err  # the same
    assert client.delete("/v1/conversations/a.b:c-d_1", headers=AUTH).status_code == 204


def test_openapi_states_the_conversation_id_limits(client):
    spec = client.get("/openapi.json").json()
    (param,) = spec["paths"]["/v1/conversations/{conversation_id}"]["delete"]["parameters"]
    body = spec["components"]["schemas"]["SearchRequest"]["properties"]["conversation_id"]
    in_body = body["anyOf"][0]
    assert param["schema"]["maxLength"] == in_body["maxLength"] == 128
    assert param["schema"]["pattern"] == in_body["pattern"]
    assert param["schema"]["minLength"] == 1
    assert "415" in spec["paths"]["/v1/search"]["post"]["responses"]


def test_head_healthz_answers_like_get(client):
    got, head = client.get("/healthz"), client.head("/healthz")
    assert head.status_code == got.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
    assert int(head.headers["content-length"]) == len(got.content)


# ---------------------------------------------------------------- session names in the log


def test_sessions_are_named_by_route_client_and_conversation(built, client):
    _, encoder = built
    encoder.session_ids.clear()
    client.post("/v1/search", json={"messages": JAGUAR}, headers=AUTH)
    client.post("/v1/search", json={"messages": JAGUAR, "conversation_id": "c7"}, headers=AUTH)
    body = {"input": [JAGUAR, JAGUAR], "model": "fake:"}
    client.post("/v1/embeddings", json=body, headers=AUTH)
    client_id = client.app.state.checker.client_id(AUTH["Authorization"])
    assert encoder.session_ids == [
        f"/v1/search of client {client_id}",
        f"/v1/search of client {client_id}, conversation c7",
        f"/v1/embeddings input[0] of client {client_id}",
        f"/v1/embeddings input[1] of client {client_id}",
    ]


# ---------------------------------------------------------------- `serve`


@pytest.fixture
def fake_model(monkeypatch):
    """Model loads recorded; uvicorn never serves (a setting let through fails the test)."""
    import uvicorn

    loads: list[str] = []

    def factory(rest: str) -> HashEncoder:
        loads.append(rest)
        return HashEncoder()

    register_encoder("fake", factory)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: loads.append("served"))
    yield loads
    unregister_encoder("fake")


@pytest.mark.parametrize("value", ["0", "-5", "60", "1023"])
def test_serve_refuses_a_body_limit_no_request_fits(built, fake_model, monkeypatch, capsys, value):
    index_dir, _ = built
    monkeypatch.setenv(ENV_VAR, KEY)
    capsys.readouterr()
    assert main(["serve", "--index", str(index_dir), "--max-body-bytes", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --max-body-bytes must be at least 1024 (a search for one short "
                   f"question takes about 60 bytes), got {value}"]  # fmt: skip
    assert fake_model == []  # refused before the model loads


def test_server_settings_refuse_a_body_limit_no_request_fits():
    from chatretriever.apps.server.app import ServerSettings

    with pytest.raises(ValueError, match="max_body_bytes must be at least 1024"):
        ServerSettings(model="m", max_body_bytes=0)
    assert ServerSettings(model="m", max_body_bytes=1024).max_body_bytes == 1024


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--rrf-k", "10"], "--rrf-k applies"),
        (["--fusion-weight", "0.9"], "--fusion-weight applies"),
        (["--rrf-k", "10", "--fusion-weight", "0.9"], "--rrf-k, --fusion-weight apply"),
        (["--bm25-formulation", "last_turn"], "--bm25-formulation applies"),
        (["--fusion-depth", "5"], "--fusion-depth applies"),
    ],
)
def test_serve_refuses_fusion_options_nothing_uses(
    built, fake_model, monkeypatch, capsys, flags, named
):
    """An index without a BM25 side and no --hybrid: nothing is fused, as `chat` and `search`
    say."""
    index_dir, _ = built
    monkeypatch.setenv(ENV_VAR, KEY)
    capsys.readouterr()
    port = str(free_port())
    assert main(["serve", "--index", str(index_dir), "--port", port, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and "only with --hybrid" in err[0], err
    assert fake_model == []  # refused before the model loads
