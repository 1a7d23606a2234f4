"""Every recipe in configs/ is accepted by the command that runs it, and each recipe built on
another differs from it in what its comment and the README say, and in nothing else.

- Classification: `COMMANDS` names the command of every YAML recipe under configs/ (the launcher
  configs in configs/accelerate/ aside: tests/test_accelerate_launch.py). A new recipe fails
  `test_each_recipe_loads_through_its_command` until it is classified there.
- Loading: through the CLI itself, `chatretriever COMMAND RECIPE --dry-run`, i.e. the loader the
  command uses (`train`'s choice of method included); nothing is trained and no weights load.
  The printed resolved recipe (what a run saves as train_config.yaml) loads back to itself, and
  the other recipe commands refuse the file.
- The loaders refuse misspelt keys and bad values (inline recipes built on a shipped one), before
  any model loads.
- Ablations and other derived recipes (`ABLATIONS`): the resolved recipe differs from its
  reference only in the listed keys, output_dir aside (uniconv-ablations/mismatched-only.yaml is
  tests/test_train.py's).
"""

from __future__ import annotations

import copy
import functools
import glob
import io
import re
from collections.abc import Callable, Mapping
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from chatretriever.cli import main
from chatretriever.modeling.card_render import dotted_value

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
LAUNCHER_DIR = "accelerate"  # accelerate's own configs, not recipes
RECIPE_COMMANDS = ("train", "train-items", "rerank-train", "rerank-distill")

# the command that runs each recipe (paths relative to configs/)
COMMANDS = {
    "chatretriever-smol.yaml": "train",
    "chatretriever-smol-v2.yaml": "train",
    "chatretriever-smol-v2-distill.yaml": "train",
    "ablations/contrastive-last-turn.yaml": "train",
    "ablations/no-session-lm.yaml": "train",
    "ablations/one-emb-token.yaml": "train",
    "ablations/vanilla-it.yaml": "train",
    "datamix/answers.yaml": "train",
    "datamix/distill.yaml": "train",
    "datamix/passages.yaml": "train",
    "datamix/topiocqa-uncapped.yaml": "train",
    "rationale-biencoder.yaml": "train",
    "uniconv-smol.yaml": "train",  # method: uniconv
    "uniconv-grounded.yaml": "train",
    "uniconv-ablations/generation-only.yaml": "train",
    "uniconv-ablations/mismatched-only.yaml": "train",
    "uniconv-ablations/no-cii.yaml": "train",
    "uniconv-ablations/retrieval-only.yaml": "train",
    "items-minilm.yaml": "train-items",
    "items-minilm-lora.yaml": "train-items",
    "items-mpnet-lora.yaml": "train-items",
    "items-smol.yaml": "train-items",
    "rationale-sft.yaml": "rerank-train",
    "rationale-dpo.yaml": "rerank-train",
    "rationale-distill.yaml": "rerank-distill",
}

# a whole recipe of each command, to put an inline (or README) fragment on through `base:`
REFERENCE = {
    "train": "chatretriever-smol.yaml",
    "train-items": "items-minilm.yaml",
    "rerank-train": "rationale-sft.yaml",
    "rerank-distill": "rationale-distill.yaml",
}


def recipe_files() -> list[str]:
    """Every YAML file under configs/ but the launcher configs, relative to configs/."""
    paths = (p.relative_to(CONFIGS) for p in CONFIGS.rglob("*.yaml"))
    return sorted(p.as_posix() for p in paths if p.parts[0] != LAUNCHER_DIR)


def command_of(name: str) -> str:
    """The command of a recipe under configs/; fails the test for an unclassified one."""
    if name not in COMMANDS:
        pytest.fail(
            f"configs/{name}: no recipe command claims it: add it to COMMANDS in "
            f"tests/test_shipped_configs.py (one of {', '.join(RECIPE_COMMANDS)})"
        )
    return COMMANDS[name]


@dataclass(frozen=True)
class DryRun:
    """What `chatretriever COMMAND RECIPE --dry-run` did: its exit status, the resolved recipe
    it printed (None on an error) and its stderr."""

    rc: int
    text: str
    error: str

    @property
    def recipe(self) -> dict[str, Any] | None:
        return yaml.safe_load(self.text) if self.rc == 0 else None


def dry_run(command: str, path: str | Path, *overrides: str) -> DryRun:
    """Run a recipe command with `--dry-run` (and `--set` overrides) in this process."""
    argv = [command, str(path), "--dry-run"]
    for item in overrides:
        argv += ["--set", item]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(argv)
    return DryRun(rc, out.getvalue(), err.getvalue().strip())


@functools.cache
def _resolved_text(name: str) -> str:
    run = dry_run(command_of(name), CONFIGS / name)
    assert run.rc == 0, f"configs/{name}: {run.error}"
    return run.text


def resolved(name: str) -> dict[str, Any]:
    """The resolved recipe of configs/NAME as its command prints it (a fresh copy)."""
    return yaml.safe_load(_resolved_text(name))


def on_shipped(tmp_path: Path, name: str, text: str) -> Path:
    """An inline recipe: configs/NAME (through `base:`) with `text`'s keys over it."""
    path = tmp_path / "inline.yaml"
    path.write_text(f"base: {CONFIGS / name}\n{text}\n", encoding="utf-8")
    return path


# --- every recipe loads through its command ----------------------------------------------------


@pytest.mark.parametrize("name", recipe_files())
def test_each_recipe_loads_through_its_command(name, tmp_path):
    command = command_of(name)
    run = dry_run(command, CONFIGS / name)
    assert run.rc == 0, f"configs/{name}: {run.error}"
    # what a run saves beside the model (train_config.yaml) is itself this recipe
    saved = tmp_path / "train_config.yaml"
    saved.write_text(run.text, encoding="utf-8")
    again = dry_run(command, saved)
    assert again.rc == 0 and again.recipe == run.recipe, again.error
    # given to another command, it stops at once (rather than training something else)
    for other in RECIPE_COMMANDS:
        if other != command:
            assert dry_run(other, CONFIGS / name).rc == 2, f"{other} accepts configs/{name}"


def test_every_classified_recipe_exists():
    assert sorted(set(COMMANDS) - set(recipe_files())) == []


def test_an_unclassified_recipe_fails():
    with pytest.raises(pytest.fail.Exception, match="configs/new.yaml: no recipe command"):
        command_of("new.yaml")


# `chatretriever train configs/x.yaml`, also after `-m` (torchrun) and in comments
NAMED_RECIPE = re.compile(
    rf"chatretriever\s+({'|'.join(RECIPE_COMMANDS)})\s+configs/([^\s`)'\"]+\.yaml)"
)


def commands_naming_recipes(text: str) -> list[tuple[int, str, str]]:
    """(line, command, recipe relative to configs/) of each recipe command in `text`;
    a `<placeholder>` in the path is expanded over the files it matches."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for command, name in NAMED_RECIPE.findall(line):
            pattern = re.sub(r"<[^<>]+>", "*", name)
            names = [
                Path(p).relative_to(CONFIGS).as_posix() for p in glob.glob(str(CONFIGS / pattern))
            ]
            found += [(n, command, x) for x in sorted(names) or [name]]
    return found


def misnamed_commands(texts: Mapping[str, str]) -> list[str]:
    """Each recipe command in the texts ({where: text}) that names a recipe of another command
    (or no recipe), as "where:line: the command (what is wrong)"."""
    wrong = []
    for where, text in texts.items():
        for line, command, name in commands_naming_recipes(text):
            if COMMANDS.get(name) != command:
                why = f"a {COMMANDS[name]} recipe" if name in COMMANDS else "not a recipe"
                wrong.append(f"{where}:{line}: chatretriever {command} configs/{name} ({why})")
    return wrong


def test_the_readme_and_the_recipes_run_each_recipe_with_its_command():
    texts = {"README.md": (ROOT / "README.md").read_text(encoding="utf-8")}
    texts |= {f"configs/{n}": (CONFIGS / n).read_text(encoding="utf-8") for n in recipe_files()}
    assert misnamed_commands(texts) == []
    named = {(c, n) for _, c, n in commands_naming_recipes(texts["README.md"])}
    assert {("train-items", "items-smol.yaml"), ("train", "datamix/answers.yaml")} <= named
    snippet = "a\n  torchrun -m chatretriever train configs/items-minilm.yaml  # x\n"
    assert misnamed_commands({"x.md": snippet}) == [
        "x.md:2: chatretriever train configs/items-minilm.yaml (a train-items recipe)"
    ]


# --- the loaders refuse misspelt keys and bad values ---------------------------------------------

MISSPELT_KEYS = [
    ("train", "chatretriever-smol.yaml", "loss: {alpah: 0}", r"unknown field\(s\) \['alpah'\]"),
    ("train", "chatretriever-smol.yaml", "training: {max_step: 3}", "did you mean 'max_steps'"),
    ("train", "chatretriever-smol.yaml", "retriever: {n_emb_token: 1}", "'n_emb_token'"),
    ("train", "chatretriever-smol.yaml", "data: {querry: last_turn}", "'querry'"),
    ("train", "chatretriever-smol.yaml", "data: {files: [{path: a, reapeat: 2}]}", "'reapeat'"),
    ("train", "chatretriever-smol.yaml", "distil: {weight: 0.5}", "'distil'"),
    ("train", "uniconv-smol.yaml", "uniconv: {cii_negative: 3}", "'cii_negative'"),
    ("train", "uniconv-smol.yaml", "distill: {weight: 0.5}", "'distill'"),  # not UniConv's
    ("train-items", "items-minilm.yaml", "lengths: {qery: 64}", "'qery'"),
    ("train-items", "items-minilm.yaml", "lora: {enable: true}", "'enable'"),
    ("rerank-train", "rationale-dpo.yaml", "dpo: {bta: 0.2}", "'bta'"),
    ("rerank-train", "rationale-sft.yaml", "max_doc_tokens: 64", "'max_doc_tokens'"),
    ("rerank-distill", "rationale-distill.yaml", "predictor: {layer: 2}", "'layer'"),
    ("rerank-distill", "rationale-distill.yaml", "kl_wieght: 1.0", "'kl_wieght'"),
]


@pytest.mark.parametrize(("command", "name", "text", "match"), MISSPELT_KEYS)
def test_a_misspelt_key_is_refused(command, name, text, match, tmp_path):
    run = dry_run(command, on_shipped(tmp_path, name, text))
    assert run.rc == 2 and re.search(match, run.error), run.error


@pytest.mark.parametrize("command", RECIPE_COMMANDS)
@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("training: {max_steps: 5}\ntraining:\n  save_steps: 7", "training", 3),
        ("training:\n  max_steps: 5\n  max_steps: 7", "max_steps", 4),
    ],
)
def test_a_key_given_twice_is_refused(command, text, key, line, tmp_path):
    # PyYAML alone keeps the last one: a first `training:` section (an ablation's first
    # `loss: {alpha: 0}`) was dropped without a word and the run trained something else
    run = dry_run(command, on_shipped(tmp_path, REFERENCE[command], text))
    assert run.rc == 2, run.text
    assert f"inline.yaml:{line}: not valid YAML" in run.error, run.error  # the second one's
    assert f"the key {key!r} is given twice" in run.error


BAD_VALUES = [
    ("train", "chatretriever-smol.yaml", "loss: {session_mask: csitt}", "session_mask"),
    ("train", "chatretriever-smol.yaml", "method: uniconvv", "method must be"),
    ("train", "chatretriever-smol.yaml", "training: {lr_scheduler_type: linaer}", "linaer"),
    ("train", "uniconv-smol.yaml", "uniconv: {cii_score: likelihod}", "cii_score"),
    ("train-items", "items-minilm.yaml", "data: {exclude_tasks: [UQ2X]}", "exclude_tasks"),
    ("rerank-train", "rationale-sft.yaml", "objective: ppo", "objective"),
    ("rerank-distill", "rationale-distill.yaml", "validation: 1", "validation"),
    # each of these passed --dry-run and failed (or did harm) only once the run had started
    ("rerank-train", "rationale-dpo.yaml", "dpo: {loss_type: sigmod}", "dpo.loss_type"),
    ("rerank-train", "rationale-dpo.yaml", "dpo: {beta: -0.1}", "dpo.beta"),
    ("rerank-train", "rationale-dpo.yaml", "dpo: {beta: 0}", "dpo.beta"),
    ("rerank-train", "rationale-sft.yaml", "max_document_tokens: 0", "max_document_tokens"),
    ("rerank-train", "rationale-sft.yaml", "max_query_tokens: -3", "max_query_tokens"),
    ("train-items", "items-minilm.yaml", "lengths: {query: 0}", "lengths.query"),
    ("train-items", "items-minilm.yaml", "lengths: {item: -2}", "lengths.item"),
    ("train", "chatretriever-smol.yaml", "output_dir: ''", "output_dir"),
    ("train", "uniconv-smol.yaml", "output_dir: ' '", "output_dir"),
    ("train", "chatretriever-smol.yaml", "training: {learning_rate: -1.0e-4}",
     "training.learning_rate"),
]  # fmt: skip


@pytest.mark.parametrize(("command", "name", "text", "match"), BAD_VALUES)
def test_a_bad_value_is_refused(command, name, text, match, tmp_path):
    run = dry_run(command, on_shipped(tmp_path, name, text))
    assert run.rc == 2 and match in run.error, run.error


# --- derived recipes differ from their reference in what they say, and nothing else ------------


class _Marker:
    """A named marker value (its name is what a finding shows)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


ANY = _Marker("ANY")  # changed, to any value
MISSING = _Marker("MISSING")  # the key is not in the resolved recipe


def renamed(names: Mapping[str, str]) -> Callable[[list[dict]], list[dict]]:
    """The reference's `data.files` with some files renamed (`outputs/train/NAME.jsonl.gz`),
    order and repeats kept: the same mix of other files."""

    def expected(files: list[dict]) -> list[dict]:
        out = copy.deepcopy(files)
        for f in out:
            head, _, tail = f["path"].rpartition("/")
            stem, dot, suffix = tail.partition(".")
            f["path"] = f"{head}/{names.get(stem, stem)}{dot}{suffix}"
        return out

    return expected


def flatten(recipe: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"loss.alpha": 0.3, ...}: nested mappings as dotted keys (lists are values)."""
    out: dict[str, Any] = {}
    for key, value in recipe.items():
        if isinstance(value, Mapping) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def lookup(recipe: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted key (MISSING when absent)."""
    return dotted_value(recipe, key, MISSING)


def unexpected_differences(
    reference: Mapping[str, Any], derived: Mapping[str, Any], changes: Mapping[str, Any]
) -> list[str]:
    """How `derived` differs from `reference` beyond `changes` ({dotted key: the value it must
    have, a function of the reference's value, or ANY}), output_dir aside; a listed change that
    the reference already has is reported too (the recipe would change nothing)."""
    problems = []
    for key, want in changes.items():
        before, after = lookup(reference, key), lookup(derived, key)
        want = want(before) if callable(want) else want
        if before is MISSING and after is MISSING:
            problems.append(f"{key}: not a key of either recipe")
        elif want is ANY and before == after:
            problems.append(f"{key}: unchanged ({before!r}), said to change")
        elif want is not ANY and (after != want or before == want):
            problems.append(f"{key}: {before!r} -> {after!r}, said to be {want!r}")
    ref, new = flatten(reference), flatten(derived)
    for key in sorted((ref.keys() | new.keys()) - {"output_dir"}):
        said = any(key == c or key.startswith(f"{c}.") for c in changes)
        if not said and ref.get(key, MISSING) != new.get(key, MISSING):
            before, after = ref.get(key, MISSING), new.get(key, MISSING)
            problems.append(f"{key}: {before!r} -> {after!r} (not what it says it changes)")
    return problems


V1, V2, UNICONV = "chatretriever-smol.yaml", "chatretriever-smol-v2.yaml", "uniconv-smol.yaml"
PASSAGES = "datamix/passages.yaml"
# the teacher-scored files (TopiOCQA: only its 2,000 capped examples are scored)
TEACHER_SCORED = {
    "topiocqa": "topiocqa-2000-t",
    **{n: f"{n}-t" for n in ("cast", "mtrag-nodev", "ikat", "dstc11")},
}
V2_SCHEDULE = (  # v2's schedule, sized for a 2-core CPU (its comment)
    "max_steps per_device_train_batch_size warmup_steps save_steps logging_steps "
    "dataloader_num_workers gradient_checkpointing"
).split()

# (recipe, the recipe it is compared with, {key: change}); the claim quoted is the recipe's own
# comment unless a README section is named
ABLATIONS = [
    # README "Ablations are configs": alpha = 0, t = 1, vanilla instruction tuning,
    # contrastive-only on last turns, each on configs/chatretriever-smol.yaml
    ("ablations/no-session-lm.yaml", V1, {"loss.alpha": 0.0}),
    ("ablations/one-emb-token.yaml", V1, {"retriever.n_emb_tokens": 1}),
    ("ablations/vanilla-it.yaml", V1, {"loss.session_mask": "vanilla"}),
    ("ablations/contrastive-last-turn.yaml", V1, {"loss.alpha": 0.0, "data.query": "last_turn"}),
    # README "What v2 changed, and what it did not: only the training data and a continuation":
    # from v1's weights, TopiOCQA capped at 2,000, half v1's learning rate
    (V2, V1, {
        "model": "runs/chatretriever-smol",
        "retriever.base_model": "runs/chatretriever-smol",
        "data.caps": {"topiocqa": 2000},
        "data.files": ANY,
        "training.learning_rate": lambda v1: v1 / 2,
        **{f"training.{key}": ANY for key in V2_SCHEDULE},
    }),
    # README "Data-mix ablation": the v2 recipe with the dev conversations held out as well;
    # answers as positives; TopiOCQA uncapped
    (PASSAGES, V2, {"data.files": renamed({"mtrag": "mtrag-nodev"})}),
    ("datamix/answers.yaml", PASSAGES, {"data.files": renamed({
        "mtrag-nodev": "mtrag-nodev-answers", "ikat": "ikat-answers", "dstc11": "dstc11-answers",
    })}),
    ("datamix/topiocqa-uncapped.yaml", PASSAGES, {"data.caps": {}}),
    # the same examples, scored by the teacher; its temperature 0.05 is the default
    ("datamix/distill.yaml", PASSAGES, {
        "distill.weight": 0.5,
        "data.files": renamed(TEACHER_SCORED),
    }),
    # README: "Its recipe on all training conversations is chatretriever-smol-v2-distill.yaml";
    # its comment: "the v2 recipe's data and schedule"
    ("chatretriever-smol-v2-distill.yaml", "datamix/distill.yaml",
     {"data.files": renamed({"mtrag-nodev-t": "mtrag-t"})}),
    ("chatretriever-smol-v2-distill.yaml", V2, {
        "distill.weight": 0.5,
        "data.files": renamed({**TEACHER_SCORED, "mtrag": "mtrag-t"}),
    }),
    # README "UniConv" ablations (uniconv/recipe.py: w/o CII, retrieval-only, generation-only);
    # uniconv-grounded: "same data, steps and budget", the grounded NLL at weight 1
    ("uniconv-ablations/no-cii.yaml", UNICONV, {"uniconv.alpha": 0.0}),
    ("uniconv-ablations/retrieval-only.yaml", UNICONV, {"loss.alpha": 0.0, "uniconv.alpha": 0.0}),
    ("uniconv-ablations/generation-only.yaml", UNICONV, {"uniconv.retrieval_weight": 0.0}),
    ("uniconv-grounded.yaml", UNICONV, {"uniconv.grounded_weight": 1.0}),
    # LoRA at ten times the full fine-tuning learning rate (r 16, every linear layer: the
    # defaults); mpnet with rank 8 (alpha 16); items-smol from chatretriever-smol at 2e-4
    ("items-minilm-lora.yaml", "items-minilm.yaml",
     {"lora.enabled": True, "training.learning_rate": lambda full: pytest.approx(full * 10)}),
    ("items-mpnet-lora.yaml", "items-minilm-lora.yaml",
     {"model": "mpnet-base", "lora.r": 8, "lora.alpha": 16}),
    ("items-smol.yaml", "items-minilm.yaml",
     {"model": "chatretriever-smol", "training.learning_rate": 2.0e-4}),
    # DPO from the SFT adapter, lr 1e-6, cosine, warmup 0.1, 5 epochs; the same pairs file
    ("rationale-dpo.yaml", "rationale-sft.yaml", {
        "objective": "dpo",
        "init_adapter": "runs/rationale-sft",
        "training.num_train_epochs": 5,
        "training.learning_rate": 1.0e-6,
        "training.lr_scheduler_type": "cosine",
        "training.warmup_steps": 0.1,
    }),
]  # fmt: skip

# derived recipes whose differences another test checks
CHECKED_ELSEWHERE = {
    "uniconv-ablations/mismatched-only.yaml": "tests/test_train.py "
    "(test_uniconv_mismatched_only_ablation_keeps_the_topiocqa_cap)",
}


@pytest.mark.parametrize(
    ("name", "reference", "changes"),
    ABLATIONS,
    ids=[f"{name} vs {reference}" for name, reference, _ in ABLATIONS],
)
def test_a_derived_recipe_differs_only_in_what_it_says(name, reference, changes):
    assert unexpected_differences(resolved(reference), resolved(name), changes) == []


def test_every_derived_recipe_says_what_it_changes():
    """A recipe built on another (`base:`), and every ablation, is compared with what it says."""
    compared = {name for name, _, _ in ABLATIONS} | set(CHECKED_ELSEWHERE)
    derived = {
        n
        for n in recipe_files()
        if "base" in (yaml.safe_load((CONFIGS / n).read_text(encoding="utf-8")) or {})
        or "ablations/" in n
        or n.startswith("datamix/")
    }
    assert sorted(derived - compared) == []


def test_a_difference_beyond_what_is_said_is_reported(tmp_path):
    text = "loss: {alpha: 0.0}\nlora: {r: 8}"
    run = dry_run("train", on_shipped(tmp_path, "chatretriever-smol.yaml", text))
    reference = resolved("chatretriever-smol.yaml")
    assert unexpected_differences(reference, run.recipe, {"loss.alpha": 0.0}) == [
        "lora.r: 16 -> 8 (not what it says it changes)"
    ]
    assert unexpected_differences(reference, run.recipe, {"loss.alpha": 0.0, "lora.r": 4}) == [
        "lora.r: 16 -> 8, said to be 4"
    ]
    # a change the reference already has, an unchanged ANY, a key neither recipe has
    assert unexpected_differences(reference, reference, {"loss.temperature": 0.01}) == [
        "loss.temperature: 0.01 -> 0.01, said to be 0.01"
    ]
    assert unexpected_differences(reference, reference, {"data.files": ANY}) == [
        f"data.files: unchanged ({reference['data']['files']!r}), said to change"
    ]
    assert unexpected_differences(reference, reference, {"loss.alpah": 0.0}) == [
        "loss.alpah: not a key of either recipe"
    ]
