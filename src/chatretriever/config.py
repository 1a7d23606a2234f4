"""Small, validated configs of the retriever, its losses and its LoRA adapter.

Each ablation of the paper is a value here, never a code copy:
- no session-masked LM loss: `LossConfig(alpha=0)`;
- one EMB token (or any t): `RetrieverConfig(n_emb_tokens=1)`;
- vanilla instruction tuning (no session mask): `LossConfig(session_mask="vanilla")`.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

DTYPES = ("auto", "bf16", "fp32")
EMB_INITS = ("mean", "eos")
POOLINGS = ("last_emb", "eos")
SESSION_MASKS = ("csit", "vanilla", "none")


def _from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Build a config dataclass from a dict; unknown keys (typos) and values of the wrong simple
    type (`check_value`) raise ValueError."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    hints = _hints(cls)
    for name, value in data.items():
        check_value(f"{cls.__name__}.{name}", value, hints.get(name))
    return cls(**dict(data))


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation naming what this module cannot resolve
        return {}


_SIMPLE = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _accepts(value: Any, kind: Any) -> bool | None:
    """Whether `value` is of the simple type `kind`; None: `kind` is not one this checks."""
    if kind is type(None):
        return value is None
    if kind in _SIMPLE:
        if isinstance(value, bool):
            return kind is bool
        if kind is float:
            return isinstance(value, (int, float))
        return isinstance(value, kind)
    origin = typing.get_origin(kind)
    if origin in (list, tuple):  # tuple[X, ...]: a YAML list of X
        item = (typing.get_args(kind) or (Any,))[0]
        if not isinstance(value, (list, tuple)):
            return False
        return all(_accepts(v, item) is not False for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return None


def check_value(name: str, value: Any, hint: Any) -> None:
    """Raise ValueError when `value` does not fit a simple annotation (int, float, bool, str,
    lists and dicts of them, optional ones); other annotations are left to the dataclass."""
    if hint is None:
        return
    options = (
        typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else (hint,)
    )
    verdicts = [_accepts(value, k) for k in options]
    if any(v is None for v in verdicts) or any(verdicts):
        return
    wanted = " or ".join(_describe(k) for k in options)
    raise ValueError(f"{name}: expected {wanted}, got {value!r}")


def _describe(kind: Any) -> str:
    if kind is type(None):
        return "null"
    if kind in _SIMPLE:
        return _SIMPLE[kind]
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        item = (typing.get_args(kind) or (Any,))[0]
        return f"a list of {_describe(item).removeprefix('a ').removeprefix('an ')}s"
    return "a mapping" if origin is dict else str(kind)


@dataclass
class RetrieverConfig:
    """How a chat LLM becomes a retriever: EMB tokens, lengths, rendering and precision.

    Attributes:
        base_model: Built-in name, local Hugging Face dir or .gguf file of the chat LLM.
        n_emb_tokens: t, the number of [EMB_i] tokens appended to every input (paper: 3).
        max_session_len: Token budget of a session, EMB tokens included.
        max_passage_len: Token budget of a passage, EMB tokens included.
        max_response_len: Token budget of the CSIT response part (it has no EMB tokens).
        normalize: L2-normalise embeddings (cosine similarity).
        dtype: "auto" (bf16 where the CPU/GPU supports it, else fp32), "bf16" or "fp32".
        fp32_layers: Under bf16, the first this-many decoder layers still run in fp32. LLMs build
            a few very large activations in their first layers, and rounding them to bf16 causes
            most of the bf16-vs-fp32 drift of the final embedding; 1 layer (3% of SmolLM2's
            compute) keeps the cosine to fp32 >= 0.999 on real passages (encode_speed.py).
        pooling: The pooled token, whose final hidden state is the embedding: "last_emb" (the
            last of the t [EMB_i] tokens appended to every input: ChatRetriever) or "eos" (the
            tokenizer's own end-of-sequence token appended instead: UniConv's choice; no token is
            added to the vocabulary, so the model's vocabulary stays as it was; needs
            n_emb_tokens = 1).
        emb_init: Initial input embedding of the new tokens: "mean" of the matrix or the "eos" row.
        system_prompt: None renders no system message (a default one injected by the template is
            replaced by an explicit empty one, see `template.py`); a string is used as the system
            message of every session and passage.
        attn_implementation: Attention kernel of the backbone ("sdpa" or "eager").
        trust_remote_code: Passed to the backbone loader.
    """

    base_model: str = "smollm2-135m-instruct"
    n_emb_tokens: int = 3
    max_session_len: int = 512
    max_passage_len: int = 256
    max_response_len: int = 256
    normalize: bool = True
    dtype: str = "auto"
    fp32_layers: int = 1
    pooling: str = "last_emb"
    emb_init: str = "mean"
    system_prompt: str | None = None
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.base_model:
            raise ValueError("RetrieverConfig.base_model must not be empty")
        if not isinstance(self.n_emb_tokens, int) or self.n_emb_tokens < 1:
            raise ValueError(f"n_emb_tokens must be an int >= 1, got {self.n_emb_tokens!r}")
        for name in ("max_session_len", "max_passage_len", "max_response_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < self.n_emb_tokens + 8:
                raise ValueError(f"{name} must be an int >= n_emb_tokens + 8, got {value!r}")
        _check_choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.fp32_layers, int) or self.fp32_layers < 0:
            raise ValueError(f"fp32_layers must be an int >= 0, got {self.fp32_layers!r}")
        _check_choice("pooling", self.pooling, POOLINGS)
        if self.pooling == "eos" and self.n_emb_tokens != 1:
            raise ValueError(
                f"pooling 'eos' appends one token (the end-of-sequence token), so n_emb_tokens "
                f"must be 1, got {self.n_emb_tokens}"
            )
        _check_choice("emb_init", self.emb_init, EMB_INITS)
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RetrieverConfig:
        return _from_dict(cls, data)


@dataclass
class LossConfig:
    """L = L_C + alpha * L_S.

    Attributes:
        alpha: Weight of the session-masked LM loss L_S (paper: 0.3; 0 = contrastive only).
        temperature: InfoNCE temperature (paper: ~0.01, with normalised embeddings).
        in_batch: Use the other examples' positives and hard negatives as negatives too.
        session_mask: "csit" (response sees only the session's EMB tokens), "vanilla" (plain causal
            mask: the response sees the whole session) or "none" (no LM part; needs alpha == 0).
        label_smoothing: Label smoothing of L_S.
        n_hard_negatives: Hard negatives per example (paper: 4).
    """

    alpha: float = 0.3
    temperature: float = 0.01
    in_batch: bool = True
    session_mask: str = "csit"
    label_smoothing: float = 0.0
    n_hard_negatives: int = 4

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        _check_choice("session_mask", self.session_mask, SESSION_MASKS)
        if self.session_mask == "none" and self.alpha != 0:
            raise ValueError("session_mask='none' trains no LM part: set alpha=0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.n_hard_negatives < 0:
            raise ValueError(f"n_hard_negatives must be >= 0, got {self.n_hard_negatives}")
        if self.n_hard_negatives == 0 and not self.in_batch:
            raise ValueError("no negatives at all: use in_batch=True or n_hard_negatives > 0")

    @property
    def uses_lm(self) -> bool:
        """Whether batches need the response part (the LM loss has a non-zero weight)."""
        return self.alpha > 0 and self.session_mask != "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LossConfig:
        return _from_dict(cls, data)


@dataclass
class LoraSettings:
    """The LoRA adapter; the EMB tokens' embeddings are always trained alongside it.

    Attributes:
        enabled: False = full fine-tuning (the whole model is trained and saved).
        r: LoRA rank.
        alpha: LoRA scaling numerator (lora_alpha).
        dropout: LoRA dropout.
        target_modules: Linear layers that get adapters.
    """

    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"))

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.r < 1:
            raise ValueError(f"LoRA r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.enabled and not self.target_modules:
            raise ValueError("LoRA target_modules must not be empty")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraSettings:
        return _from_dict(cls, data)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
