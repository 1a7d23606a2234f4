"""The Rabtriever distillation recipe: `DistillConfig` (`configs/rationale-distill.yaml`) and
`run_distill` (the teacher's features once, cached; the predictor trained on them). The saved
student is loaded to score by `student.RabtrieverStudent`.

The teacher is the reranker exactly as `BinaryChoiceReranker.from_pretrained` loads it: the
backbone, the tuned LoRA adapter (none: the zero-shot teacher), the wording and the prompt
budgets. Its features go to `output_dir/features.safetensors` with a fingerprint of what they
depend on (model name, adapter weights, wording, budgets, the selected pairs): a rerun whose
fingerprint matches reuses them; any other recipe or data recomputes and replaces them.

The output dir holds `predictor.safetensors`, `predictor.json`, `train_config.yaml` (the resolved
recipe: what `RabtrieverStudent.from_pretrained` reloads the LLM from), `train_log.jsonl` and the
features.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from chatretriever.config import _from_dict
from chatretriever.errors import DataFormatError
from chatretriever.io.atomic import atomic_path
from chatretriever.io.sessions import session_to_dict
from chatretriever.methods.rationale.distill import (
    DistillFeatures,
    PredictorConfig,
    RabtrieverEncoder,
    distill_features,
)
from chatretriever.methods.rationale.distill_train import (
    PREDICTOR_TRAINING,
    Validation,
    predictor_arguments,
    query_groups,
    renumber,
    split_groups,
    subset,
    train_predictor,
)
from chatretriever.methods.rationale.pairs import ChoicePair, iter_pairs
from chatretriever.methods.rationale.prompts import WORDINGS
from chatretriever.modeling.model_card import CardSpec, write_run_card
from chatretriever.modeling.recipe import check_training_settings, save_recipe
from chatretriever.modeling.recipe_data import BaseDataSettings, load_examples

logger = logging.getLogger(__name__)

FEATURES = "features.safetensors"

# the model card of a saved student (`model_card`)
CARD = CardSpec(
    what="A Rabtriever student: a predictor over the frozen reranker LLM's states of a document "
    "and of a conversation, each read alone (a bi-encoder distilled from the reranker)",
    python="""from chatretriever.methods.rationale.student import RabtrieverStudent

student = RabtrieverStudent.from_pretrained($dir)
queries = student.query_states(["i had a rough day at work"])
scores = student.score(queries, student.document_states(["ask how they feel"]))""",
    cli=("python benchmarks/rationale.py quality --student NAME=$dir   # from a checkout: ESConv",),
    settings=("adapter", "wording", "max_document_tokens", "max_query_tokens", "kl_weight",
              "rank_weight", "validation", "eval_steps", "predictor.inner", "predictor.layers",
              "predictor.residual", "predictor.dropout"),
    example_unit="queries",
)  # fmt: skip


@dataclass
class DistillData(BaseDataSettings):
    """`data:`: pairs JSONL files (`esconv-tasks`' `pairs.jsonl`) and an optional cap.

    Attributes:
        limit: At most this many pairs, taken as whole sessions (a query's gold pair and its
            negatives together) evenly spaced over all the files' pairs: deterministic, and the
            yes/no balance is kept. A file's own `limit` keeps its first N pairs instead.
    """

    limit: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"data.limit must be a positive integer, got {self.limit!r}")


@dataclass
class PredictorSettings:
    """`predictor:`: `PredictorConfig` but the hidden size, which the LLM gives."""

    inner: int | None = None
    layers: int = 2
    residual: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.inner is not None and (not isinstance(self.inner, int) or self.inner < 1):
            raise ValueError(f"predictor.inner must be a positive integer, got {self.inner!r}")
        self.config(1)  # validates the rest

    def config(self, hidden: int) -> PredictorConfig:
        """The predictor's config for an LLM of hidden size `hidden`."""
        return PredictorConfig(hidden, self.inner, self.layers, self.residual, self.dropout)


# The budgets of a teacher without recorded ones (`rationale-sft.yaml`'s, which `rahore-smol`
# was tuned with): short strategy documents, the recent end of a conversation.
DISTILL_BUDGETS = {"max_document_tokens": 64, "max_query_tokens": 256}


@dataclass
class DistillConfig:
    """A Rabtriever distillation recipe (`configs/rationale-distill.yaml`).

    Attributes:
        model: The reranker's chat backbone (built-in name or local dir).
        adapter: The tuned reranker's LoRA dir (`rerank-train` output); None: zero-shot teacher.
        output_dir: Where the features, the predictor and the resolved recipe go.
        wording: The prompt wording the teacher was tuned with ("ab", "tf").
        max_document_tokens, max_query_tokens: Prompt budgets; None (not given): the adapter's
            tuned ones (its recipe), as `rerank` scores, else `DISTILL_BUDGETS` (64 / 256). The
            saved recipe records the numbers used.
        data: The training pairs (`DistillData`).
        predictor: Its shape (`PredictorSettings`).
        kl_weight: Weight of the reverse-KL part (the MSE part has weight 1).
        rank_weight: Weight of the `rank` part (within-query MSE of centred log-odds; 0: off).
        validation: Fraction of the training dialogs (a session's `metadata["dialog"]`, else
            its id) held out to pick the best predictor state (0: off, the last state is kept).
        eval_steps: Steps between validation checks.
        batch_size: Sequences per LLM forward when computing features.
        training: Any `TrainingArguments` field, over `distill_train.PREDICTOR_TRAINING`; the
            batch size counts queries (each with all its pairs).
    """

    model: str = "smollm2-135m-instruct"
    adapter: str | None = None
    output_dir: str = "runs/rationale-distill"
    wording: str = "ab"
    max_document_tokens: int | None = None
    max_query_tokens: int | None = None
    data: DistillData = field(default_factory=DistillData)
    predictor: PredictorSettings = field(default_factory=PredictorSettings)
    kl_weight: float = 1.0
    rank_weight: float = 0.0
    validation: float = 0.0
    eval_steps: int = 20
    batch_size: int = 16
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.wording not in WORDINGS:
            raise ValueError(f"wording must be one of {sorted(WORDINGS)}, got {self.wording!r}")
        for name in ("max_document_tokens", "max_query_tokens", "batch_size", "eval_steps"):
            value = getattr(self, name)
            if value is None and name.startswith("max_"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("kl_weight", "rank_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not isinstance(self.validation, (int, float)) or not 0 <= self.validation < 1:
            raise ValueError(f"validation must be a fraction in [0, 1), got {self.validation!r}")
        check_training_settings(self.training)
        self.training = {**PREDICTOR_TRAINING, **self.training}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DistillConfig:
        raw = dict(raw)
        for key, kind in (("data", DistillData), ("predictor", PredictorSettings)):
            value = raw.get(key) or {}
            if not isinstance(value, Mapping):
                raise ValueError(f"{key} must be a mapping, got {type(value).__name__}")
            raw[key] = _from_dict(kind, value)
        if not isinstance(raw.get("training") or {}, Mapping):
            raise ValueError("training must be a mapping of TrainingArguments fields")
        return _from_dict(cls, raw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def spread_pairs(pairs: Sequence[ChoicePair], limit: int) -> list[ChoicePair]:
    """At most `limit` pairs: whole sessions, evenly spaced (see `DistillData.limit`)."""
    if len(pairs) <= limit:
        return list(pairs)
    groups: dict[str, list[ChoicePair]] = {}
    for p in pairs:
        groups.setdefault(p.session.id, []).append(p)
    sessions = list(groups.values())
    k = max(1, limit * len(sessions) // len(pairs))  # the sessions that fit at the mean size
    picked = [sessions[i * len(sessions) // k] for i in range(k)]
    return [p for group in picked for p in group][:limit]


def load_pairs(data: DistillData) -> list[ChoicePair]:
    """The training pairs: every file x its repeat, then `data.limit`."""
    pairs = [p for examples, repeat in load_examples(data, iter_pairs) for p in examples * repeat]
    if not pairs:
        raise ValueError(f"data.files hold no pairs: {[f.path for f in data.files]}")
    return pairs if data.limit is None else spread_pairs(pairs, data.limit)


def teacher_encoder(config: DistillConfig, device: str | None = None) -> RabtrieverEncoder:
    """The frozen LLM exactly as the reranker loads it (backbone + adapter + prompt)."""
    from chatretriever.methods.rationale.reranker import BinaryChoiceReranker

    reranker = BinaryChoiceReranker.from_pretrained(
        config.model,
        adapter=config.adapter,
        wording=config.wording,
        device=device,
        batch_size=config.batch_size,
        max_document_tokens=config.max_document_tokens,
        max_query_tokens=config.max_query_tokens,
    )
    return RabtrieverEncoder(reranker.model, reranker.prompt, config.batch_size)


def features_fingerprint(config: DistillConfig, pairs: Sequence[ChoicePair]) -> str:
    """sha256 of what the features depend on (the batch size does not enter)."""
    from chatretriever.modeling.adapters import ADAPTER_WEIGHTS

    h = hashlib.sha256()
    keys = ("model", "adapter", "wording", "max_document_tokens", "max_query_tokens")
    h.update(json.dumps({k: getattr(config, k) for k in keys}).encode())
    if config.adapter is not None and (Path(config.adapter) / ADAPTER_WEIGHTS).is_file():
        h.update((Path(config.adapter) / ADAPTER_WEIGHTS).read_bytes())  # retrained in place
    for p in pairs:
        row = [p.document, session_to_dict(p.session), p.relevant]
        h.update(json.dumps(row, sort_keys=True).encode() + b"\n")
    return h.hexdigest()


def cached_features(
    encoder: RabtrieverEncoder, pairs: Sequence[ChoicePair], path: Path, fingerprint: str
) -> DistillFeatures:
    """The features of `pairs`: read from `path` when its fingerprint matches, else computed
    (with progress bars) and written there atomically."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file, save_file

    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                stored = (f.metadata() or {}).get("fingerprint")
        except SafetensorError as e:
            logger.warning("%s is unreadable (%s): recomputing", path, e)
            stored = None
        if stored == fingerprint:
            logger.info("reusing the teacher features of %d pairs from %s", len(pairs), path)
            return DistillFeatures(**load_file(str(path)))
        if stored is not None:
            logger.info("%s was computed for another recipe or data: recomputing", path)
    logger.info("computing the teacher features of %d pairs", len(pairs))
    features = distill_features(
        encoder, [p.document for p in pairs], [p.session for p in pairs], show_progress=True
    )
    with atomic_path(path) as tmp:
        tensors = {k: v.contiguous() for k, v in asdict(features).items()}
        save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint})
    return features


def run_distill(config: DistillConfig) -> Path:
    """Features (cached), the predictor trained on them, the resolved recipe; returns the dir."""
    pairs = load_pairs(config.data)
    logger.info("%d pairs (%d relevant)", len(pairs), sum(p.relevant for p in pairs))
    from chatretriever.methods.rationale.tuned_adapter import resolve_adapter, resolve_budgets

    # A built-in teacher ("rahore-smol") is read from its dir; the saved recipe keeps the name.
    found = None
    if config.adapter is not None:
        try:
            found = resolve_adapter(config.adapter)
        except ValueError as e:
            raise DataFormatError(config.adapter, str(e), field="adapter") from e
    # Budgets not given: the teacher's tuned ones, as `rerank` scores, else DISTILL_BUDGETS
    # (numbers from here on: the features' fingerprint and the saved recipe record them).
    given = resolve_budgets(found, config.max_document_tokens, config.max_query_tokens)
    config = replace(config, **{**DISTILL_BUDGETS, **given})
    local = config
    if found is not None and not Path(config.adapter).exists():
        local = replace(config, adapter=str(found))
    out = Path(config.output_dir)
    # checked before the teacher loads and scores every pair (minutes): a combination of
    # `training:` settings TrainingArguments refuses fails in seconds
    predictor_arguments(out, config.training)
    encoder = teacher_encoder(local)
    fingerprint = features_fingerprint(local, pairs)
    features = cached_features(encoder, pairs, out / FEATURES, fingerprint)
    predictor = config.predictor.config(features.query.shape[1])
    train, val = split_groups(pairs, query_groups(pairs), config.validation)
    validation = None
    if val:
        logger.info("%d training / %d validation queries", len(train), len(val))
        validation = Validation(subset(features, val), renumber(val), config.eval_steps)
    train_predictor(encoder, subset(features, train), out, predictor, config.kl_weight,
                    config.training, renumber(train), config.rank_weight, validation)  # fmt: skip
    save_recipe(config, out)
    write_run_card(out, CARD, config, config.training, n_examples=len(train))
    return out
