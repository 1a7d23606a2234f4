"""A UniConv training recipe: the CSIT recipe's sections plus `uniconv:` (L_CII and the weights),
marked by `method: uniconv` so that `chatretriever train RECIPE` runs this trainer.

    method: uniconv
    model: smollm2-135m-instruct
    output_dir: runs/uniconv-smol
    retriever: {n_emb_tokens: 3, max_session_len: 384, max_response_len: 96}
    loss: {alpha: 1.0, temperature: 0.01, session_mask: csit}   # alpha = weight of L_G
    uniconv: {alpha: 0.5, cii_negatives: 3, cii_score: likelihood}  # alpha = weight of L_CII
    lora: {r: 16, alpha: 32}
    data: {files: [{path: outputs/train/mtrag.jsonl}], caps: {topiocqa: 2000}}
    training: {max_steps: 300, per_device_train_batch_size: 8}

`retriever: {pooling: eos, n_emb_tokens: 1}` pools the end-of-sequence token as the paper does
(`config.RetrieverConfig.pooling`). The ablations of the paper are recipes that differ in one
value: w/o CII (`uniconv.alpha: 0`), retrieval-only (`loss.alpha: 0`, `uniconv.alpha: 0`),
generation-only (`uniconv.retrieval_weight: 0`), w/o format-matched data (`data.files`: the
mismatched sources only). YAML, `base:`, `--set`, data files, caps, saving and resume are
`modeling.recipe`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chatretriever.config import LoraSettings, LossConfig, RetrieverConfig
from chatretriever.methods.uniconv.train import UniConvSettings
from chatretriever.modeling.model_card import CardSpec
from chatretriever.modeling.recipe import load_config, prepare_llm_run, recipe_from_dict
from chatretriever.modeling.recipe_data import DataSettings

METHOD = "uniconv"

# the model card of a saved run (`model_card`): what it is and how to load it
CARD = CardSpec(
    what="A UniConv model: one chat LLM that retrieves passages for a conversation and writes "
    "the grounded answer from them",
    python="""from chatretriever import UniConv

model = UniConv.from_pretrained($dir)
session = [{"role": "user", "content": "what is UniConv?"}]
vectors = model.encode_sessions([session])
answer = model.answer(session, ["UniConv retrieves and answers."], max_new_tokens=32)""",
    cli=(
        "chatretriever index CORPUS.jsonl --out INDEX_DIR --model $dir",
        "chatretriever answer --index INDEX_DIR --sessions SESSIONS.jsonl --out ANSWERS.jsonl"
        "   # retrieves and answers with the index's UniConv",
    ),
    settings=(
        "loss.alpha", "loss.temperature", "loss.n_hard_negatives", "loss.in_batch",
        "uniconv.alpha", "uniconv.retrieval_weight", "uniconv.cii_negatives", "uniconv.cii_score",
        "uniconv.grounded_weight", "uniconv.max_context_tokens", "retriever.n_emb_tokens",
        "retriever.pooling", "retriever.max_session_len", "retriever.max_passage_len",
        "retriever.max_response_len", "retriever.dtype",
    ),
)  # fmt: skip


@dataclass
class UniConvRecipe:
    """The whole recipe of one UniConv run (see the module docstring)."""

    model: str
    output_dir: str
    data: DataSettings
    method: str = METHOD
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    loss: LossConfig = field(default_factory=lambda: LossConfig(alpha=1.0))
    uniconv: UniConvSettings = field(default_factory=UniConvSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UniConvRecipe:
        if data.get("method", METHOD) != METHOD:
            raise ValueError(
                f"method must be {METHOD!r} in a UniConv recipe, got {data['method']!r}"
            )
        return recipe_from_dict(
            cls,
            data,
            {
                "data": DataSettings,
                "retriever": RetrieverConfig,
                "loss": LossConfig,
                "uniconv": UniConvSettings,
                "lora": LoraSettings,
            },
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lora"] = self.lora.to_dict()
        return out


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> UniConvRecipe:
    """Read a YAML UniConv recipe (and its `base:` chain), apply overrides and validate it.

    Raises:
        DataFormatError: naming the file and what is wrong.
    """
    return load_config(path, UniConvRecipe.from_dict, overrides)


def run_training(config: UniConvRecipe, resume: bool = False, overwrite: bool = False) -> Path:
    """Train a UniConv as the recipe says; returns the saved model dir (`output_dir`)."""
    from chatretriever.methods.uniconv.model import UniConv
    from chatretriever.methods.uniconv.train import UniConvTrainer, make_collator

    args, checkpoint, dataset, model = prepare_llm_run(config, resume, UniConv, overwrite)
    trainer = UniConvTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=make_collator(model, config.loss, config.uniconv),
        loss_config=config.loss,
        settings=config.uniconv,
    )
    return trainer.train_and_save(checkpoint, config, CARD)
