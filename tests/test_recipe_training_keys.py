"""A recipe's `training:` keys are checked when the recipe loads, by every recipe command, against
the fields of the arguments class its run builds: a misspelt one stops `--dry-run` (and the
README's `--set` check, tests/readme_set_keys.py) rather than the run after its model has loaded.

The runs build transformers' TrainingArguments (`modeling.trainer.training_arguments`: train,
train-items, rerank-train's SFT, rerank-distill's predictor) or TRL's DPOConfig (rerank-train's
DPO); the loaders check against TrainingArguments (`modeling.recipe.check_training_settings`).
"""

from __future__ import annotations

import dataclasses

import pytest
from test_shipped_configs import CONFIGS, dry_run

# (command, recipe, extra --set items): each recipe class once, `train`'s two methods both ways
RECIPE_CLASSES = [
    ("train", "chatretriever-smol.yaml", ()),
    ("train", "uniconv-smol.yaml", ()),
    ("train", "chatretriever-smol.yaml", ("method=uniconv",)),
    ("train-items", "items-minilm.yaml", ()),
    ("rerank-train", "rationale-sft.yaml", ()),
    ("rerank-train", "rationale-dpo.yaml", ()),
    ("rerank-distill", "rationale-distill.yaml", ()),
]


@pytest.mark.parametrize(("command", "name", "extra"), RECIPE_CLASSES)
@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("training.max_step=3", "training.max_step: not a TrainingArguments field; did you "
         "mean 'max_steps'?"),
        ("training.per_device_train_batchsize=4", "did you mean 'per_device_train_batch_size'?"),
    ],
)  # fmt: skip
def test_a_misspelt_training_key_stops_the_load(command, name, extra, item, message):
    run = dry_run(command, CONFIGS / name, *extra, item)
    assert run.rc == 2, run.text
    assert f"{name}: " in run.error and message in run.error, run.error


@pytest.mark.parametrize(("command", "name", "extra"), RECIPE_CLASSES)
def test_a_real_training_key_loads(command, name, extra):
    run = dry_run(command, CONFIGS / name, *extra, "training.gradient_checkpointing=true")
    assert run.rc == 0, run.error
    assert run.recipe["training"]["gradient_checkpointing"] is True


def test_dpo_config_takes_every_field_the_loaders_accept():
    """DPO's DPOConfig must take every TrainingArguments field: one it lacked would pass the
    load and fail only in `run_dpo`, after the model has loaded."""
    from transformers import TrainingArguments

    trl = pytest.importorskip("trl")
    accepted = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    taken = {f.name for f in dataclasses.fields(trl.DPOConfig) if f.init}
    assert accepted - taken == set()
