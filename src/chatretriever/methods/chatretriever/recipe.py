"""A training recipe: one YAML file that says everything a CSIT run needs, and the run itself.

    method: chatretriever               # optional, the default (`method: uniconv`: a UniConv)
    model: smollm2-135m-instruct        # base chat LLM (built-in name, HF dir, .gguf) or saved dir
    output_dir: runs/chatretriever-smol
    retriever: {n_emb_tokens: 3, max_session_len: 384, ...}     # RetrieverConfig
    loss: {alpha: 0.3, temperature: 0.01, session_mask: csit}  # LossConfig
    lora: {r: 16, alpha: 32}          # LoraSettings (enabled: false = full fine-tuning)
    distill: {weight: 0.5, temperature: 0.05}  # optional teacher distillation (default off)
    data:
      query: session                    # or last_turn (the contrastive-only last-turn ablation)
      caps: {topiocqa: 5000}            # at most this many examples of a source (hash sample)
      files:
        - {path: outputs/train/topiocqa.jsonl}
        - {path: outputs/train/mtrag.jsonl, repeat: 10}
    training: {max_steps: 500, per_device_train_batch_size: 16, ...}  # TrainingArguments

A `model:` that is a saved ChatRetriever directory continues training from its weights: the
settings those weights depend on (retriever.n_emb_tokens, pooling, emb_init (not under eos
pooling), lora.enabled, r, alpha, target_modules) must equal the saved ones (else a one-line
error names the field), the others (lengths, dtype, dropout, ...) follow the recipe, and the
base model stays the saved one.

A recipe may start with `base: other.yaml` (a path relative to it): the other recipe is read
first and this one's keys replace or extend it, so an ablation names only what it changes.
Relative data paths are read from the directory the command runs in. `--set key.sub=value`
overrides any field (the value is parsed as YAML). The resolved recipe is saved beside the model
as `train_config.yaml`; the ablations of the paper are recipes that differ in one value.

The machinery (YAML, `base:`, `--set`, data files, saving, resume) is `modeling.recipe`, shared
by every method; this module holds CSIT's sections and its run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chatretriever.config import LoraSettings, LossConfig, RetrieverConfig
from chatretriever.modeling.model_card import CardSpec
from chatretriever.modeling.recipe import load_config, prepare_llm_run, recipe_from_dict
from chatretriever.modeling.recipe_data import DataSettings

METHOD = "chatretriever"  # a recipe's `method:` (the default of `chatretriever train`)

# the model card of a saved run (`model_card`): what it is and how to load it
CARD = CardSpec(
    what="A ChatRetriever (CSIT) session retriever: a chat LLM that embeds whole conversations "
    "and passages into one vector space",
    python="""from chatretriever import ChatRetriever

retriever = ChatRetriever.from_pretrained($dir)
sessions = retriever.encode_sessions([[{"role": "user", "content": "what is CSIT?"}]])
passages = retriever.encode_passages(["CSIT trains a chat LLM to embed conversations."])""",
    cli=(
        "chatretriever index CORPUS.jsonl --out INDEX_DIR --model $dir",
        "chatretriever chat --index INDEX_DIR   # the index records the model",
    ),
    settings=(
        "loss.temperature", "loss.alpha", "loss.n_hard_negatives", "loss.in_batch",
        "loss.session_mask", "distill.weight", "distill.temperature", "retriever.n_emb_tokens",
        "retriever.pooling", "retriever.max_session_len", "retriever.max_passage_len",
        "retriever.max_response_len", "retriever.dtype",
    ),
)  # fmt: skip


@dataclass
class DistillSettings:
    """The optional teacher distillation part: weight * KL(teacher || student) over each
    example's positive and hard negatives, teacher scores read from the training file
    (`build-train ... --teacher NAME`); the student's scores use `loss.temperature`.

    Attributes:
        weight: Weight of the "distill" loss part (0 = off, the default).
        temperature: Temperature of the teacher's softmax (its scores are cosines: lower is
            sharper).
    """

    weight: float = 0.0
    temperature: float = 0.05

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"distill.weight must be >= 0, got {self.weight}")
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.temperature}")


@dataclass
class TrainConfig:
    """The whole recipe of one training run (see the module docstring)."""

    model: str
    output_dir: str
    data: DataSettings
    method: str = METHOD
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: dict[str, Any] = field(default_factory=dict)
    distill: DistillSettings = field(default_factory=DistillSettings)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        if data.get("method", METHOD) != METHOD:
            raise ValueError(
                f"method must be {METHOD!r} in a ChatRetriever recipe (or 'uniconv', chosen by "
                f"`chatretriever train`), got {data['method']!r}"
            )
        return recipe_from_dict(
            cls,
            data,
            {
                "data": DataSettings,
                "retriever": RetrieverConfig,
                "loss": LossConfig,
                "lora": LoraSettings,
                "distill": DistillSettings,
            },
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lora"] = self.lora.to_dict()
        return out


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML recipe (and its `base:` chain), apply overrides and validate it.

    Raises:
        DataFormatError: naming the file and what is wrong.
    """
    return load_config(path, TrainConfig.from_dict, overrides)


def run_training(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train a ChatRetriever with CSIT as the recipe says; returns the saved model dir.

    Args:
        config: The recipe.
        resume: Continue from the newest checkpoint in `output_dir` (a fresh start if none).
        overwrite: Start over in an `output_dir` that holds another run (`check_output_dir`).

    Returns:
        `output_dir`, holding the final model, the resolved recipe and the training log.
    """
    from chatretriever.methods.chatretriever.model import ChatRetriever
    from chatretriever.methods.chatretriever.train import CsitTrainer, make_collator

    read = None
    if config.distill.weight > 0:  # every example needs scores: found before the model loads
        from functools import partial

        from chatretriever.io.training import iter_training_examples

        read = partial(iter_training_examples, require_teacher="distill.weight > 0")
    args, checkpoint, dataset, retriever = prepare_llm_run(
        config, resume, ChatRetriever, overwrite, read
    )
    trainer = CsitTrainer(
        model=retriever,
        args=args,
        train_dataset=dataset,
        data_collator=make_collator(retriever, config.loss, config.data.query, config.distill),
        loss_config=config.loss,
        distill=config.distill,
    )
    return trainer.train_and_save(checkpoint, config, CARD)
