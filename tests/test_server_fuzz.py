"""Property-based fuzzing of the HTTP API: zero 5xx, every answer is JSON in the documented shape.

Two fuzzers over the fake-encoder app: schemathesis generates requests from the app's own OpenAPI
schema (valid bodies and, in negative mode, bodies that break it) and validates every response
against that schema; hypothesis throws arbitrary JSON values and raw bytes at each endpoint.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from server_helpers import AUTH, KEY, build_fake_index, make_app

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

EXAMPLES = 60  # per operation and mode: the whole file runs in well under a minute

_SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    index_dir, encoder = build_fake_index(tmp_path_factory.mktemp("fuzz"))
    return make_app(index_dir, encoder, api_keys=(KEY,), max_body_bytes=64 * 1024)


@pytest.fixture(scope="module")
def http(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


# The rules a valid-by-schema request can still break (checked in the handlers/validators).
CROSS_FIELD_RULES = (
    "the last message must have role 'user'",  # a session ends with the question
    "is not served here",  # `model` names another model
    "dimensions: this model gives",
    "this index has no BM25 side",
    "at most 256 items",
    "a session holds",
    "must not be empty",
    "is empty",  # an empty question or text (JSON Schema cannot say "not blank")
)

OPERATIONS = [
    ("POST", "/v1/search"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"),
    ("GET", "/healthz"),
    ("DELETE", "/v1/conversations/{conversation_id}"),
]


def test_the_fuzzed_operations_are_all_the_api(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


WITH_INPUT = [op for op in OPERATIONS if op[0] != "GET"]  # nothing to break in a plain GET
CASES = [(*op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (*op, GenerationMode.NEGATIVE) for op in WITH_INPUT
]


# Valid generated requests to these must get real answers, not only refusals.
REACH_THE_MODEL = {"/v1/search", "/v1/embeddings"}


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_schema_fuzz_never_answers_5xx(api_schema, method, path, mode):
    """Requests generated from the OpenAPI schema (negative mode: bodies that break it). The
    statuses are counted inside this test, so the "reached the model" check holds whatever else
    runs (-k, xdist, any order)."""
    seen: Counter = Counter()  # status -> answers

    @given(data=st.data())
    @settings(max_examples=EXAMPLES, suppress_health_check=_SUPPRESS, deadline=None, database=None)
    def fuzz(data):
        case = data.draw(api_schema[path][method].as_strategy(generation_mode=mode))
        if path == "/v1/embeddings" and mode is GenerationMode.POSITIVE:
            case.body["model"] = "fake:"  # the served name: a random one is a 404 every time
        response = case.call(headers=AUTH)
        seen[response.status_code] += 1
        _check_answer(case, response, mode)

    fuzz()
    if mode is GenerationMode.POSITIVE and path in REACH_THE_MODEL:
        assert seen[200] > 0, seen


def _check_answer(case, response, mode: GenerationMode) -> None:
    """No 5xx; an error is {"error": {"message"}}; a valid request is answered as documented."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and body["error"]["message"]
    if mode is GenerationMode.POSITIVE:
        # schema-valid bodies may still break a rule JSON Schema cannot state: then say which
        if response.status_code in (404, 422):
            assert any(rule in response.json()["error"]["message"] for rule in CROSS_FIELD_RULES)
        # status codes, content types and bodies as documented
        case.validate_response(response, excluded_checks=[positive_data_acceptance])


def _json_values():
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner),
        max_leaves=30,
    )


def _bodies():
    """Arbitrary JSON, near-valid requests with one field replaced, and raw bytes."""
    fields = ["messages", "k", "conversation_id", "hybrid", "input", "model", "encoding_format"]
    valid = {"messages": [{"role": "user", "content": "jaguars"}], "input": "x", "model": "fake:"}
    near = st.fixed_dictionaries({}, optional={f: _json_values() for f in fields}).map(
        lambda changed: {**valid, **changed}
    )
    as_json = (_json_values() | near).map(lambda v: json.dumps(v).encode())
    return as_json | st.binary(max_size=200)


@pytest.mark.parametrize("path", ["/v1/search", "/v1/embeddings"])
@given(body=_bodies(), content_type=st.sampled_from(["application/json", "text/plain", ""]))
@settings(max_examples=150, suppress_health_check=_SUPPRESS, deadline=None)
def test_arbitrary_bodies_get_a_json_4xx_or_a_200(http, path, body, content_type):
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    response = http.post(path, content=body, headers=headers)
    if content_type != "application/json":  # not read as JSON, whatever it holds
        assert response.status_code == 415, response.text
    assert response.status_code in (200, 400, 404, 413, 415, 422), response.text
    payload = response.json()
    if response.status_code != 200:
        assert isinstance(payload["error"]["message"], str) and "Traceback" not in response.text


PATH_CHARS = st.characters(min_codepoint=33, max_codepoint=0x2FFF, exclude_characters="?#\x7f")


@given(
    path=st.text(PATH_CHARS, max_size=40), method=st.sampled_from(["GET", "POST", "PUT", "DELETE"])
)
@settings(max_examples=100, suppress_health_check=_SUPPRESS, deadline=None)
def test_arbitrary_paths_never_fail_on_the_server(http, path, method):
    response = http.request(method, "/" + path.lstrip("/"), headers=AUTH)
    assert response.status_code < 500
