"""Resolve a model name given on the command line (or in a benchmark) to an `Encoder`.

- a name with a registered prefix ("prefix:rest") -> that prefix's factory (tests register fakes);
- a built-in model of kind "encoder" ("minilm-l6", "mpnet-base", see
  `modeling.sources.BUILTIN_MODELS`)
  or a local sentence-transformers directory -> `TextEmbedder`;
- a UniConv directory (it holds `uniconv.json`), built-in or local ->
  `UniConv.from_pretrained` (it retrieves and writes grounded answers);
- anything else (a ChatRetriever directory or built-in name) -> `ChatRetriever.from_pretrained`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chatretriever.retrieval.encoders import Encoder, fingerprint_of

logger = logging.getLogger(__name__)

# The shipped ChatRetriever model: what `index`, `chat` and `demo` use when no --model is given.
DEFAULT_MODEL = "chatretriever-smol"

_FACTORIES: dict[str, Callable[[str], Encoder]] = {}


def register_encoder(prefix: str, factory: Callable[[str], Encoder]) -> None:
    """Make `load_encoder("<prefix>:<rest>")` call `factory("<rest>")`.

    Args:
        prefix: A short scheme name without ":" (e.g. "fake").
        factory: Builds an encoder from the rest of the name.
    """
    if not prefix or ":" in prefix:
        raise ValueError(f"bad encoder prefix {prefix!r}")
    _FACTORIES[prefix] = factory


def unregister_encoder(prefix: str) -> None:
    _FACTORIES.pop(prefix, None)


def is_sentence_transformers_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "modules.json").is_file() or (path / "sentence_bert_config.json").is_file()


def _is_builtin_embedder(name: str) -> bool:
    from chatretriever.modeling.sources import BUILTIN_MODELS

    info = BUILTIN_MODELS.get(name)
    return info is not None and info.kind == "encoder" and not Path(name).exists()


def _is_uniconv(name: str) -> bool:
    """Whether `name` is a saved UniConv: a directory, or a built-in trained retriever's one."""
    from chatretriever.methods.uniconv import SAVED_CONFIG
    from chatretriever.modeling.sources import builtin_retriever_dir

    directory = builtin_retriever_dir(name) or Path(name)
    return (directory / SAVED_CONFIG).is_file()


# what a model directory holds at least one of (ChatRetriever, UniConv, transformers,
# sentence-transformers, a PEFT adapter, Rabtriever's predictor)
_MODEL_FILES = (
    "chatretriever.json",
    "uniconv.json",
    "config.json",
    "modules.json",
    "adapter_config.json",
    "predictor.json",
)


def load_encoder(name: str) -> Encoder:
    """The encoder a model name stands for (see the module docstring)."""
    prefix, sep, rest = name.partition(":")
    if sep and prefix in _FACTORIES:
        return _FACTORIES[prefix](rest)
    if Path(name).is_dir() and not any((Path(name) / f).is_file() for f in _MODEL_FILES):
        raise ValueError(
            f"{name}: not a model directory (it has none of {', '.join(_MODEL_FILES)}): give a "
            "trained ChatRetriever, a transformers or sentence-transformers directory, or a "
            "built-in name (`chatretriever models`)"
        )
    if _is_builtin_embedder(name) or is_sentence_transformers_dir(name):
        from chatretriever.retrieval.baselines import TextEmbedder

        return TextEmbedder.from_pretrained(name)
    if _is_uniconv(name):
        from chatretriever.methods.uniconv.model import UniConv

        return UniConv.from_pretrained(name)
    from chatretriever.methods.chatretriever.model import ChatRetriever

    return ChatRetriever.from_pretrained(name)


def query_model(given: str | None, loaded: Any, index_dir: str | Path) -> str:
    """The model to encode queries for an index with: `given` (--model), else the one the
    index records (`CorpusIndex.model`), else the encoder its vectors name when that name loads
    (a built-in model or an existing directory) and they record its fingerprint (an index built
    from embedding directories; the fingerprint check that follows refuses any other model).

    Args:
        given: The model asked for, or None.
        loaded: The `CorpusIndex` (its `model` and `index.meta`).
        index_dir: The index directory (for the messages).

    Raises:
        ValueError: No model can be told.
    """
    from chatretriever.modeling.sources import builtin

    if given:
        return given
    if loaded.model:
        return loaded.model
    meta = getattr(loaded.index, "meta", None)
    name = getattr(meta, "model", None)
    if name and getattr(meta, "fingerprint", None) and (builtin(name) or Path(name).is_dir()):
        logger.info("%s records no model to load: using %s, its vectors' encoder", index_dir, name)
        return name
    raise ValueError(f"{index_dir} does not record its model: pass --model NAME")


def set_precision(encoder: Encoder, dtype: str) -> bool:
    """Sets the compute precision of a ChatRetriever or a sentence embedder.

    Args:
        encoder: The model; any other `Encoder` (a fake, an API client) is left as it is.
        dtype: "fp32", "bf16" or "auto" (bf16 where the device runs it natively).

    Returns:
        Whether the encoder has a precision to set.
    """
    from chatretriever.config import DTYPES, RetrieverConfig
    from chatretriever.retrieval.baselines import TextEmbedder

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(getattr(encoder, "config", None), RetrieverConfig):  # ChatRetriever
        encoder.config.dtype = dtype
        return True
    if isinstance(encoder, TextEmbedder):
        from chatretriever.modeling.backbones import native_bf16

        device = next(encoder.model.parameters()).device
        encoder.bf16 = dtype == "bf16" or (dtype == "auto" and native_bf16(device))
        return True
    return False


def precision_of(encoder: Encoder) -> str | None:
    """The precision an encoder computes in ("bf16" or "fp32"), None for one without a switch."""
    from chatretriever.config import RetrieverConfig
    from chatretriever.retrieval.baselines import TextEmbedder

    if isinstance(getattr(encoder, "config", None), RetrieverConfig):  # ChatRetriever
        return "bf16" if str(encoder.compute_dtype) == "torch.bfloat16" else "fp32"
    if isinstance(encoder, TextEmbedder):
        return "bf16" if encoder.bf16 else "fp32"
    return None


def match_precision(encoder: Encoder, fingerprint: str | None) -> str | None:
    """Compute queries in the precision an index's vectors were computed in.

    An index records its encoder's fingerprint, which covers the compute precision: an index
    encoded in fp32 (the demo's) refuses bf16 queries of the very same model, and the other
    way round. When switching this encoder's precision makes its fingerprint equal to
    `fingerprint`, the switch is kept.

    Args:
        encoder: The query encoder (left as it is when it has no precision switch).
        fingerprint: The index's recorded encoder fingerprint (None: nothing to match).

    Returns:
        The precision switched to ("fp32" or "bf16"), or None when nothing changed (already
        matching, no switch, or no precision matches: then the index check says why).
    """
    current = fingerprint_of(encoder)
    before = precision_of(encoder)
    if not fingerprint or current in (None, fingerprint) or before is None:
        return None
    other = "bf16" if before == "fp32" else "fp32"
    set_precision(encoder, other)
    if fingerprint_of(encoder) == fingerprint:
        logger.info("queries computed in %s: the precision the index was encoded in", other)
        return other
    set_precision(encoder, before)
    return None
