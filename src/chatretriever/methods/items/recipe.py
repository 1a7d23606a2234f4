"""The item-embedder recipe: one YAML file (see `configs/items-minilm.yaml`) and its run.

    model: minilm-l6                  # built-in embedder name or a sentence-transformers dir
    output_dir: runs/items-minilm
    loss: {temperature: 0.01, in_batch: false, n_negatives: 7}
    lengths: {query: 512, item: 128}
    lora: {enabled: false, r: 16, alpha: 32, dropout: 0.05, target_modules: [all-linear]}
    data:
      files: [{path: outputs/items/train.jsonl.gz}]
      exclude_tasks: []               # leave-one-task-out: train without these tasks
    training: {max_steps: 300, per_device_train_batch_size: 16, learning_rate: 3.0e-5, ...}

YAML, `base:`, `--set key=value`, the saved `train_config.yaml` and `--resume` are the shared
`modeling.recipe` machinery; the trainer is the shared `NamedLossTrainer`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chatretriever.config import LoraSettings
from chatretriever.methods.items.templates import TASKS
from chatretriever.modeling.model_card import CardSpec
from chatretriever.modeling.recipe import load_config, recipe_from_dict
from chatretriever.modeling.recipe_data import BaseDataSettings, load_examples

logger = logging.getLogger(__name__)

# the model card of a saved run (`model_card`); `load_encoder` loads both kinds of item embedder
# (a sentence-transformers dir, or a ChatRetriever dir from `--embedder chatretriever`)
CARD = CardSpec(
    what="An item embedder (RecLM-emb item retrieval): it embeds what a user asks for and the "
    "catalog's items into one vector space",
    python="""from chatretriever.apps.registry import load_encoder

embedder = load_encoder($dir)  # as `eval-items --model` and `recommend --model` load it
items = embedder.encode_passages(["title: Portal 2, tags: puzzle, co-op"])
queries = embedder.encode_sessions([[{"role": "user", "content": "a co-op puzzle game"}]])""",
    cli=(
        "chatretriever eval-items ITEMS_DIR --model $dir   # ITEMS_DIR: a build-items output",
        "chatretriever recommend --items CATALOG --model $dir",
    ),
    settings=("loss.temperature", "loss.in_batch", "loss.n_negatives", "lengths.query",
              "lengths.item"),
)  # fmt: skip


@dataclass
class ItemLossSettings:
    """Contrastive settings: the paper's temperature, 7 negatives, no in-batch negatives."""

    temperature: float = 0.01
    in_batch: bool = False
    n_negatives: int = 7

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")
        if self.n_negatives < (0 if self.in_batch else 1):
            raise ValueError("loss.n_negatives must be >= 1 without in-batch negatives")


@dataclass
class Lengths:
    """Token budgets (the paper: query 512, item 128)."""

    query: int = 512
    item: int = 128

    def __post_init__(self) -> None:
        for name in ("query", "item"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"lengths.{name} must be a positive integer, got {value!r}")


@dataclass
class ItemDataSettings(BaseDataSettings):
    """Training files, and tasks left out (the leave-one-task-out generalisation run)."""

    exclude_tasks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [t for t in self.exclude_tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"data.exclude_tasks: unknown tasks {unknown}")


@dataclass
class ItemLoraSettings(LoraSettings):
    """Full fine-tuning by default; with `enabled: true`, LoRA on every linear layer of the
    encoder (peft's "all-linear": attention and feed-forward, whatever their names)."""

    enabled: bool = False
    target_modules: tuple[str, ...] = ("all-linear",)


@dataclass
class ItemTrainConfig:
    """The whole recipe of one item-embedder run (see the module docstring)."""

    model: str
    output_dir: str
    data: ItemDataSettings
    loss: ItemLossSettings = field(default_factory=ItemLossSettings)
    lengths: Lengths = field(default_factory=Lengths)
    lora: LoraSettings = field(default_factory=ItemLoraSettings)
    training: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ItemTrainConfig:
        return recipe_from_dict(
            cls,
            data,
            {
                "data": ItemDataSettings,
                "loss": ItemLossSettings,
                "lengths": Lengths,
                "lora": ItemLoraSettings,
            },
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_item_recipe(path: str | Path, overrides: Sequence[str] = ()) -> ItemTrainConfig:
    """Read a YAML recipe (its `base:` chain, `--set` overrides) and validate it."""
    return load_config(path, ItemTrainConfig.from_dict, overrides)


def run_item_training(config: ItemTrainConfig, resume: bool = False, model: Any = None) -> Path:
    """Train an item embedder as the recipe says; returns the saved model directory.

    Args:
        config: The recipe.
        resume: Continue from the newest checkpoint in `output_dir`.
        model: An `ItemEmbedder` to train instead of loading `config.model` as a
            `SentenceEmbedder` (how the apps layer passes in an LLM embedder).

    Returns:
        `output_dir`: the final model, the resolved recipe and the training log.
    """
    from transformers import set_seed

    from chatretriever.methods.items.data import iter_item_examples
    from chatretriever.methods.items.train import ItemCollator, ItemLoss, SentenceEmbedder
    from chatretriever.modeling.recipe import save_recipe
    from chatretriever.modeling.run_dir import resume_checkpoint
    from chatretriever.modeling.trainer import NamedLossTrainer, TrainingSet, training_arguments

    out = Path(config.output_dir)
    settings = {"learning_rate": 3e-5, **config.training}
    args = training_arguments(out, settings, precision_setting="(fp32 only)")
    skip = set(config.data.exclude_tasks)
    parts = [
        ([ex for ex in examples if ex.task not in skip], repeat)
        for examples, repeat in load_examples(config.data, iter_item_examples)
    ]
    _check_examples(config, [ex for examples, _ in parts for ex in examples])
    set_seed(args.seed)
    if model is None:
        model = SentenceEmbedder.from_pretrained(
            config.model,
            query_max_len=config.lengths.query,
            item_max_len=config.lengths.item,
            lora=config.lora,
        )
    model.train()
    if args.process_index == 0:
        save_recipe(config, out)
    trainer = NamedLossTrainer(
        model=model,
        args=args,
        train_dataset=TrainingSet(parts),
        data_collator=ItemCollator(config.loss.n_negatives),
        loss_fn=ItemLoss(config.loss.temperature, config.loss.in_batch),
    )
    return trainer.train_and_save(resume_checkpoint(out, resume), config, CARD)


def _check_examples(config: ItemTrainConfig, examples: Sequence[Any]) -> None:
    """Refuse a training set that cannot teach anything: no example at all (after
    `exclude_tasks`), or no negative anywhere while in-batch negatives are off (the loss would
    be a constant 0); warn when only some examples lack negatives."""
    files = ", ".join(str(f.path) for f in config.data.files)
    if not examples:
        skipped = (
            f" (exclude_tasks: {config.data.exclude_tasks})" if config.data.exclude_tasks else ""
        )
        raise ValueError(f"{files}: no training examples{skipped}")
    bare = sum(not ex.negatives for ex in examples)
    if bare and not config.loss.in_batch:
        if bare == len(examples):
            raise ValueError(
                f"{files}: no example has negatives and loss.in_batch is off: the loss would be "
                "0 at every step (add negatives or set loss.in_batch=true)"
            )
        logger.warning(
            "%d of %d examples have no negatives: they add 0 to the loss", bare, len(examples)
        )
