"""Tuning the binary-choice reranker: supervised (the right option as target) and DPO (TRL).

Training pairs are the JSON lines of `pairs.py` (a document, a conversation, whether it fits).
Supervised tuning runs on the shared `NamedLossTrainer` with one named part, `sft`: the
cross-entropy of the right option's token at the answer position (over the whole vocabulary, as
generation would see it). DPO runs TRL's `DPOTrainer` on (prompt, chosen option, rejected option)
triples, given as the token ids the reranker scores (`dpo_rows`). Both train a LoRA adapter,
saved with the resolved recipe (`train_config.yaml`) beside it; the reranker loads it with
`BinaryChoiceReranker.from_pretrained(model, adapter=dir)`. A run into an `output_dir` that holds
another run is refused unless resumed (same recipe) or overwritten (`prepare_output_dir`).

The adapter is new (the recipe's `lora`), or with `init_adapter` the one a previous run saved,
trained further: the paper's pipeline is SFT, then DPO from the SFT adapter. DPO's reference is
the base model with the adapter switched off for a new adapter, and a frozen copy of the
starting adapter (TRL's "ref" adapter) for `init_adapter`, so its first loss is log 2.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from chatretriever.config import DTYPES, LoraSettings, _from_dict
from chatretriever.errors import require_extra
from chatretriever.methods.rationale.pairs import ChoiceCollator, ChoicePair, dpo_rows, iter_pairs
from chatretriever.methods.rationale.prompts import WORDINGS, BinaryChoicePrompt
from chatretriever.methods.rationale.scoring import option_logits
from chatretriever.modeling.adapters import peft_lora_config
from chatretriever.modeling.model_card import CardSpec
from chatretriever.modeling.recipe import check_training_settings
from chatretriever.modeling.recipe_data import BaseDataSettings, load_examples

logger = logging.getLogger(__name__)

# the model card of a tuned adapter (`model_card`); DPO's adds its settings
CARD = CardSpec(
    what="A RaHoRe binary-choice reranker: a LoRA adapter with which the chat LLM answers "
    "whether a document fits a conversation (log P(yes) is the score)",
    python="""from chatretriever.methods.rationale.reranker import BinaryChoiceReranker

reranker = BinaryChoiceReranker.from_pretrained($model, adapter=$dir, wording=$wording)
scores = reranker.score_pairs(["ask how they feel"], ["i had a rough day at work"])""",
    cli=("chatretriever rerank --run RUN.trec --corpus CORPUS.jsonl --sessions SESSIONS.jsonl "
         "--out RERANKED.trec --model $model --adapter $dir --wording $wording",),
    settings=("objective", "init_adapter", "wording", "dtype", "max_document_tokens",
              "max_query_tokens"),
    example_unit="pairs",
)  # fmt: skip
DPO_CARD = replace(CARD, settings=(*CARD.settings, "dpo.beta", "dpo.loss_type"))


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Supervised loss: cross-entropy of the target token at the answer position.

    Args:
        logits: (B, V) logits at the answer position.
        targets: (B,) the right option's token id.

    Returns:
        {"sft": scalar mean cross-entropy}.
    """
    return {"sft": torch.nn.functional.cross_entropy(logits.float(), targets)}


def sft_loss_fn(pad_id: int, vocab: int, dtype: torch.dtype = torch.float32) -> Any:
    """The `NamedLossFn` of supervised tuning: one forward, full-vocabulary logits at the end.

    Args:
        pad_id: The tokenizer's pad id.
        vocab: Vocabulary size (every token's logit enters the cross-entropy).
        dtype: Compute dtype: bf16 runs the forward under bf16 autocast (weights stay fp32;
            the loss is taken in fp32), fp32 runs it as loaded.
    """
    every_token = list(range(vocab))

    def loss_fn(model: Any, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        device_type = next(model.parameters()).device.type
        bf16 = dtype == torch.bfloat16
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            logits = option_logits(model, inputs["sequences"], every_token, pad_id)  # (B, V)
        return answer_loss(logits, inputs["targets"].to(logits.device))

    return loss_fn


# The single losses TRL's DPOTrainer (trl 1.x, DPOConfig.loss_type) knows.
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip


@dataclass
class DpoSettings:
    """TRL DPO settings (the released RaHoRe scripts: sigmoid loss, beta 0.1), checked on load:
    TRL itself refuses an unknown loss only at the first training step."""

    beta: float = 0.1
    loss_type: str = "sigmoid"

    def __post_init__(self) -> None:
        beta = self.beta
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
            # beta scales the log-ratio margin: at or below 0 it trains towards the rejected one
            raise ValueError(f"dpo.beta must be a number > 0, got {beta!r}")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(
                f"dpo.loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {self.loss_type!r}"
            )


@dataclass
class TuneConfig:
    """A reranker-tuning recipe (`configs/rationale-*.yaml`).

    Attributes:
        objective: "sft" (supervised, the shared trainer) or "dpo" (TRL's DPOTrainer).
        model: The chat backbone (built-in name or local dir).
        output_dir: Where the adapter, checkpoints and the resolved recipe go.
        wording: The prompt wording ("ab", "tf").
        dtype: Training precision: "auto" (bf16 autocast where the CPU/GPU runs bf16 natively,
            else fp32), "bf16" or "fp32". DPO passes it to TRL as `bf16`.
        max_document_tokens, max_query_tokens: Prompt budgets.
        lora: The LoRA adapter (ignored with `init_adapter`: the saved one's settings hold).
        init_adapter: A LoRA adapter dir saved by `rerank-train` (e.g. runs/rationale-sft) to
            train further instead of a new one; with DPO, a frozen copy of it is the reference.
            Checked (adapter_config.json present) when training starts, not on load, so a
            recipe can be printed before the run that writes it.
        data: `files`: pairs JSONL (`write_pairs`).
        dpo: DPO settings (objective "dpo").
        training: Any `TrainingArguments` field.
    """

    objective: str = "sft"
    model: str = "smollm2-135m-instruct"
    output_dir: str = "runs/rationale-sft"
    wording: str = "ab"
    dtype: str = "auto"
    max_document_tokens: int = 256
    max_query_tokens: int = 384
    lora: LoraSettings = field(default_factory=LoraSettings)
    init_adapter: str | None = None
    data: BaseDataSettings = field(default_factory=lambda: BaseDataSettings([{"path": "?"}]))
    dpo: DpoSettings = field(default_factory=DpoSettings)
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.objective not in ("sft", "dpo"):
            raise ValueError(f"objective must be 'sft' or 'dpo', got {self.objective!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.init_adapter is not None and not isinstance(self.init_adapter, str):
            raise ValueError(f"init_adapter must be a directory path, got {self.init_adapter!r}")
        if self.wording not in WORDINGS:
            raise ValueError(f"wording must be one of {', '.join(WORDINGS)}, got {self.wording!r}")
        for name in ("max_document_tokens", "max_query_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_training_settings(self.training)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TuneConfig:
        raw = dict(raw)
        raw["lora"] = _from_dict(LoraSettings, raw.get("lora") or {})
        raw["data"] = _from_dict(BaseDataSettings, raw.get("data") or {})
        raw["dpo"] = _from_dict(DpoSettings, raw.get("dpo") or {})
        return _from_dict(cls, raw)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lora"] = self.lora.to_dict()
        return out


def _model_and_prompt(config: TuneConfig) -> tuple[Any, Any, BinaryChoicePrompt]:
    from chatretriever.modeling.backbones import load_backbone

    model, tokenizer = load_backbone(config.model, kind="causal")
    prompt = BinaryChoicePrompt(
        tokenizer, config.wording, config.max_document_tokens, config.max_query_tokens
    )
    return model, tokenizer, prompt


def _init_adapter(config: TuneConfig) -> Path | None:
    """`config.init_adapter` as a checked Path (None without one).

    Raises:
        ValueError: The dir is missing or holds no adapter_config.json.
    """
    if config.init_adapter is None:
        return None
    from chatretriever.modeling.adapters import adapter_dir_problem

    path = Path(config.init_adapter)
    problem = adapter_dir_problem(path)
    if problem is not None:
        raise ValueError(f"init_adapter: {path}: {problem} (train the adapter first)")
    return path


def _load_init_adapter(model: Any, path: Path) -> Any:
    """`model` with the adapter in `path` loaded trainable, as peft's "default" adapter."""
    from chatretriever.modeling.adapters import load_adapter

    logger.info("training on from the adapter in %s (the recipe's lora settings are ignored)", path)
    return load_adapter(model, path, is_trainable=True)


def _pairs(config: TuneConfig) -> list[ChoicePair]:
    return [
        p for examples, repeat in load_examples(config.data, iter_pairs) for p in examples * repeat
    ]


def prepare_output_dir(config: TuneConfig, resume: bool = False, overwrite: bool = False) -> None:
    """Check `output_dir` before a run writes to it, as `chatretriever train` does.

    A fresh run into a dir holding another run (its checkpoints, or a saved adapter) is refused
    unless `overwrite` (its checkpoints are removed: `--resume` would continue them); `resume`
    continues only a run of the same recipe (its `train_config.yaml`), up to how long it trains
    and how it saves and logs. The recipe is saved at once, so a started run can be checked too.

    Raises:
        ValueError: One line naming the dir and `--resume` / `--overwrite`.
    """
    from chatretriever.modeling.recipe import save_recipe
    from chatretriever.modeling.run_dir import (
        check_output_dir,
        check_resumed_recipe,
        remove_paths,
    )

    out = Path(config.output_dir)
    if resume and overwrite:
        raise ValueError(
            "--resume continues the run in output_dir, --overwrite replaces it: not both"
        )
    # the shared check: checkpoints, a saved model or adapter; a finished run is not resumed
    stale = check_output_dir(out, resume, overwrite)
    if resume:
        check_resumed_recipe(config, out)  # the shared rule: same recipe, bar length/saving
        return
    remove_paths(stale)
    save_recipe(config, out)


def run_sft(config: TuneConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Supervised tuning on the shared trainer; returns the output dir (adapter + recipe).

    `resume` continues the run in `output_dir` (same recipe only), `overwrite` starts over in
    a dir that holds another run (`prepare_output_dir`).
    """
    from chatretriever.modeling.backbones import default_device
    from chatretriever.modeling.precision import resolve_dtype
    from chatretriever.modeling.run_dir import resume_checkpoint
    from chatretriever.modeling.trainer import NamedLossTrainer, TrainingSet, training_arguments

    init = _init_adapter(config)
    # built before the model loads: a combination TrainingArguments refuses fails in seconds
    args = training_arguments(config.output_dir, config.training, "the recipe's dtype")
    prepare_output_dir(config, resume, overwrite)
    model, tokenizer, prompt = _model_and_prompt(config)
    if init is not None:
        model = _load_init_adapter(model, init)
    else:
        peft = require_extra("peft", "train", "LoRA")
        model = peft.get_peft_model(model, peft_lora_config(config.lora))
    model.train()
    trainer = NamedLossTrainer(
        model=model,
        args=args,
        train_dataset=TrainingSet([(_pairs(config), 1)]),
        data_collator=ChoiceCollator(prompt),
        loss_fn=sft_loss_fn(
            prompt.tokenizer.pad_token_id or 0,
            len(tokenizer),
            resolve_dtype(config.dtype, default_device()),
        ),
    )
    checkpoint = resume_checkpoint(config.output_dir, resume)
    return trainer.train_and_save(checkpoint, config, CARD)


def _id_rows_dpo_trainer(trl: Any) -> Any:
    """TRL's DPOTrainer taking `dpo_rows`' token ids as they are.

    TRL 1.x tokenizes text rows itself and has no switch for pre-tokenized ones; its collator
    reads `prompt_ids` / `chosen_ids` / `rejected_ids`, which `_prepare_dataset` would make.
    """

    class IdRowsDPOTrainer(trl.DPOTrainer):
        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, *args, **kwargs)

        def create_model_card(self, *args: Any, **kwargs: Any) -> None:
            # TRL writes its draft into output_dir at every checkpoint, over any README there;
            # the final save writes this package's card instead (`model_card`)
            return None

    return IdRowsDPOTrainer


def run_dpo(config: TuneConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """DPO with TRL's DPOTrainer and a LoRA adapter; returns the output dir.

    The rows are the token ids the reranker scores (`dpo_rows`); `resume` / `overwrite` as in
    `run_sft`.

    With `init_adapter`, the model passed to TRL is already a peft model and no `peft_config` is
    given: TRL 1.x then copies its "default" adapter into a frozen "ref" adapter and computes
    the reference log-probs with that one active (trl `DPOTrainer.__init__`; this version has no
    `ref_adapter_name` option). Only "default" is saved, at the top of the output dir.
    """
    trl = require_extra("trl", "train", "DPO tuning")
    datasets = require_extra("datasets", "train", "DPO tuning")
    from chatretriever.modeling.backbones import default_device
    from chatretriever.modeling.model_card import write_trainer_card
    from chatretriever.modeling.precision import resolve_dtype
    from chatretriever.modeling.recipe import LOG_FILE, save_recipe, write_log
    from chatretriever.modeling.run_dir import final_save, resume_checkpoint

    init = _init_adapter(config)
    device = default_device()
    settings = {"max_steps": 200, "learning_rate": 1e-6, "lr_scheduler_type": "cosine",
                "warmup_steps": 0.1, "per_device_train_batch_size": 8, "logging_steps": 10,
                "save_steps": 50, "save_total_limit": 2, "report_to": [], "seed": 42,
                # TRL defaults to bf16, which TrainingArguments refuses on a CPU without use_cpu
                "bf16": resolve_dtype(config.dtype, device) == torch.bfloat16,
                "use_cpu": device.type == "cpu",
                **config.training}  # fmt: skip
    args = trl.DPOConfig(
        output_dir=config.output_dir,
        beta=config.dpo.beta,
        loss_type=[config.dpo.loss_type],
        max_length=None,
        **settings,
    )  # built before the model loads: a combination TrainingArguments refuses fails in seconds
    prepare_output_dir(config, resume, overwrite)
    model, tokenizer, prompt = _model_and_prompt(config)
    if init is not None:
        model = _load_init_adapter(model, init)
    rows = dpo_rows(prompt, _pairs(config))
    trainer = _id_rows_dpo_trainer(trl)(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=None if init is not None else peft_lora_config(config.lora),
    )
    trainer.train(resume_from_checkpoint=resume_checkpoint(config.output_dir, resume))
    out = Path(config.output_dir)
    if trainer.args.process_index == 0:  # one writer (final_save clears others' staging dirs)
        with final_save(out) as staging:  # moved in as one set, adapter_config.json last
            # the trained adapter only: TRL's frozen "ref" copy would land in out/ref/
            trainer.model.save_pretrained(staging, selected_adapters=["default"])
            save_recipe(config, staging)
            write_log(staging / LOG_FILE, trainer.state.log_history)
            write_trainer_card(out, DPO_CARD, config, trainer, staging)
    trainer.accelerator.wait_for_everyone()
    return out
