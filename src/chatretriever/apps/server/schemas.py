"""Request and response bodies of the HTTP API (pydantic), with their size limits.

Every request model forbids unknown fields, so a typo ("mesages") is a 422 naming the field rather
than a silently ignored option. The limits are part of the schema (and so of the OpenAPI document):
a request over one gets a 422 whose message names the field and the limit. The body-size limit is
enforced before parsing (`app.BodyLimitMiddleware`, 413).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    ValidationError,
    model_validator,
)

# chat messages in one session: a long conversation is sent whole (a client keeping a
# `conversation_id` sends every turn again) and the model's template drops its oldest exchanges;
# this bounds only a request's parsing work (the 1 MiB body limit bounds it too)
MAX_MESSAGES = 1024
MAX_TEXT_CHARS = 16_000  # characters in one message or one input string
MAX_INPUTS = 256  # strings or sessions in one embeddings request
MAX_K = 100  # passages per search
MAX_ID_CHARS = 128  # conversation ids and model names
ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"  # conversation ids, in the body and in the path
DEFAULT_K = 10


# A text field. pydantic already refuses strings no tokenizer takes (lone surrogates, which JSON
# can carry as "\ud800"): a 422, never an error inside the model.
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Name = Annotated[str, Field(max_length=MAX_ID_CHARS)]


def _json_integer(value: object) -> object:
    if isinstance(value, (bool, str)):  # pydantic would read "3" as 3 and true as 1
        raise ValueError("expected a JSON integer")
    return value


# An integer as JSON has it: 3 or 3.0 (JSON Schema's "integer"), never "3" or true.
JsonInt = Annotated[int, BeforeValidator(_json_integer)]


class FieldError(ValueError):
    """A rule over a whole request field broken (checked by a model validator): names the field,
    so that the error's `param` is the field and not the whole body.

    Args:
        param: The request field at fault ("messages", "input").
        message: What is wrong, starting with where ("input[1]: the text is empty").
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _text_parts(value: object) -> object:
    """OpenAI's list-of-parts content ([{"type": "text", "text": ...}, ...]) as one string (its
    text parts joined by newlines); a part of another type (an image) is refused by name."""
    if not isinstance(value, list):
        return value
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"content[{i}]: only text parts can be read, got {kind!r}")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"content[{i}]: a text part needs a string 'text'")
        texts.append(part["text"])
    return "\n".join(texts)


class Message(_Strict):
    """One chat message, OpenAI style: `content` a string or a list of text parts; `name` (a
    participant's name) is accepted and not read, so OpenAI messages can be forwarded as they
    are."""

    role: Literal["system", "user", "assistant"]
    content: Annotated[Text, BeforeValidator(_text_parts)]
    name: Name | None = None


Messages = list[Message]


def _check_session(messages: Messages, where: str) -> None:
    """A session must end with the user's current question (what `types.Session` requires)."""
    param = where.split("[")[0]
    if messages and messages[-1].role != "user":
        raise FieldError(
            param, f"{where}: the last message must have role 'user' (the current question)"
        )
    if messages and not messages[-1].content.strip():
        raise FieldError(param, f"{where}: the current question (the last message) is empty")


INPUT_SHAPES = "a string, a list of strings, a list of chat messages or a list of such lists"
_TOKEN_ARRAYS = (
    "input: token arrays are not supported, send the texts as strings (LangChain's "
    "OpenAIEmbeddings: check_embedding_ctx_length=False)"
)
# each shape of `input`, told by its first item: what every item must be, and its validator
_ITEMS = {
    str: ("a string", TypeAdapter(list[Text])),
    dict: ("a chat message (an object with role and content)", TypeAdapter(Messages)),
    list: ("a list of chat messages", TypeAdapter(list[Messages])),
}


def _json_kind(value: object) -> str:
    """What a JSON value is, as a person would name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: a bool is an int in Python
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), "a value")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_input_shape(raw: object) -> None:
    """Refuse an embeddings `input` of no accepted shape, or of mixed shapes, in one line that
    names the first item at fault (raises FieldError for "input")."""
    if isinstance(raw, str):
        if len(raw) > MAX_TEXT_CHARS:
            raise FieldError("input", f"input: at most {MAX_TEXT_CHARS} characters, got {len(raw)}")
        return
    first = raw[0] if isinstance(raw, list) and raw else None
    if _is_int(raw) or _is_int(first) or (isinstance(first, list) and first and _is_int(first[0])):
        raise FieldError("input", _TOKEN_ARRAYS)
    if not isinstance(raw, list):
        raise FieldError("input", f"input: expected {INPUT_SHAPES}, got {_json_kind(raw)}")
    if not raw:
        return  # "must not be empty", after the fields are read
    if type(first) not in _ITEMS:
        raise FieldError(
            "input", f"input[0]: expected a string or a chat message, got {_json_kind(first)}"
        )
    what, adapter = _ITEMS[type(first)]
    for i, item in enumerate(raw):
        if type(item) is not type(first):
            raise FieldError(
                "input",
                f"input[{i}]: expected {what}, got {_json_kind(item)} (all items of input must "
                "be of one kind: strings, chat messages or lists of chat messages)",
            )
        if isinstance(item, str) and len(item) > MAX_TEXT_CHARS:
            raise FieldError(
                "input", f"input[{i}]: at most {MAX_TEXT_CHARS} characters, got {len(item)}"
            )
    try:
        adapter.validate_python(raw)
    except ValidationError as e:
        raise FieldError("input", _items_message(e)) from None


def _items_message(error: ValidationError) -> str:
    """pydantic's errors of one input shape as "input[1].role: problem; ..." (the first few)."""
    lines = []
    for err in error.errors(include_url=False)[:3]:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        problem = str(err["msg"]).replace(" or instance of Message", " (a chat message)")
        lines.append(f"input{where}: {problem}")
    more = error.error_count() - len(lines)
    return "; ".join(lines) + (f"; and {more} more" if more > 0 else "")


class SearchRequest(_Strict):
    """`POST /v1/search`: the conversation so far -> the top-k passages for it."""

    messages: Messages = Field(min_length=1, max_length=MAX_MESSAGES)
    k: JsonInt = Field(DEFAULT_K, ge=1, le=MAX_K)
    conversation_id: str | None = Field(
        None, min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN
    )
    hybrid: StrictBool = Field(
        False, description="fuse with the index's BM25 side (when it has one)"
    )

    @model_validator(mode="after")
    def _ends_with_user(self) -> SearchRequest:
        _check_session(self.messages, "messages")
        return self


class SearchHit(BaseModel):
    """One ranked passage."""

    rank: int
    id: str
    title: str
    text: str
    score: float


class SearchResponse(BaseModel):
    """The ranked passages for a conversation."""

    object: Literal["search.result"] = "search.result"
    model: str
    conversation_id: str | None = None
    data: list[SearchHit]


class EmbeddingsRequest(_Strict):
    """`POST /v1/embeddings`, OpenAI compatible.

    `input` is a string or a list of strings (encoded as passages), or, as an extension, one
    session (a list of chat messages) or a list of sessions (encoded as conversational queries).
    """

    input: Text | list[Text] | list[Messages] | Messages = Field(
        description="passages (strings) or sessions (lists of chat messages)"
    )
    model: Name
    encoding_format: Literal["float", "base64"] = "float"
    # the bound before the validator: after it, the OpenAPI schema would lose its "minimum"
    dimensions: Annotated[int, Field(ge=1), BeforeValidator(_json_integer)] | None = Field(
        None, description="must equal the model's size if given"
    )
    user: Name | None = None

    @model_validator(mode="before")
    @classmethod
    def _plain_input_errors(cls, data: Any) -> Any:
        """Say plainly what the union of input shapes would report as a list of mismatches: the
        shape is told by `input` (its first item), and checked as that shape alone."""
        if isinstance(data, dict) and "input" in data:
            _check_input_shape(data["input"])
        return data

    @model_validator(mode="after")
    def _check_input(self) -> EmbeddingsRequest:
        items = self.input if isinstance(self.input, list) else [self.input]
        if not items:
            raise FieldError("input", "input: must not be empty")
        if len(items) > MAX_INPUTS:
            raise FieldError(
                "input", f"input: at most {MAX_INPUTS} items per request, got {len(items)}"
            )
        if isinstance(items[0], str):
            # each string's length and text are checked by `Text`; an empty one encodes nothing
            blank = next((i for i, x in enumerate(items) if not str(x).strip()), None)
            if blank is not None:
                where = f"input[{blank}]" if isinstance(self.input, list) else "input"
                raise FieldError("input", f"{where}: the text is empty")
        elif isinstance(items[0], Message):
            _check_session(items, "input")  # type: ignore[arg-type]
            if len(items) > MAX_MESSAGES:
                raise FieldError("input", f"input: a session holds at most {MAX_MESSAGES} messages")
        else:
            for i, session in enumerate(items):
                if not session or len(session) > MAX_MESSAGES:  # type: ignore[arg-type]
                    raise FieldError(
                        "input", f"input[{i}]: a session holds 1 to {MAX_MESSAGES} messages"
                    )
                _check_session(session, f"input[{i}]")  # type: ignore[arg-type]
        return self

    def kind_and_items(self) -> tuple[str, list[str] | list[Messages]]:
        """("passages", strings) or ("sessions", message lists), one item per output row."""
        if isinstance(self.input, str):
            return "passages", [self.input]
        if isinstance(self.input[0], str):
            return "passages", list(self.input)  # type: ignore[arg-type]
        if isinstance(self.input[0], Message):
            return "sessions", [self.input]  # type: ignore[list-item]
        return "sessions", list(self.input)  # type: ignore[arg-type]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    """Counts whitespace-separated words (the server does not tokenise a second time)."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "chatretriever"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    passages: int
    dim: int
    incremental: bool
    hybrid: bool = False
    incremental_stats: dict[str, int] = Field(default_factory=dict)
    auth: bool
    batches: int
    items: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, OpenAI style: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorBody
