"""Loading each `--set KEY=VALUE` of the README into the recipe it overrides, through the loader
of its command (tests/test_readme_commands.py; the extraction: tests/readme_commands.py).

- Commands: those of a recipe subcommand (one whose parser takes `--set`: train, train-items,
  rerank-train, rerank-distill). Each is loaded as the CLI loads it: `chatretriever SUB RECIPE
  --dry-run --set ...` run in this process (`test_shipped_configs.dry_run`), so `train`'s choice
  of method (`method: uniconv`, `--set method=uniconv`) and every check of the loaders apply;
  nothing trains and no weights load. Its other options (`--resume`, `--embedder`) change no
  loading and are left out. When it does not load, each `--set` that fails alone (with the
  `method=` items kept: they choose the recipe class) is a finding at its own line; when none
  does, the first `--set` carries the error.
- Its recipe: a file under configs/ as named; a path with a placeholder (`configs/datamix/<mix>
  .yaml`) is loaded as each file it matches (glob); a recipe that is not in the repository
  (`outputs/distill8.yaml`) cannot be loaded, so each `--set` is loaded into every shipped recipe
  class of that command instead (a note records it).
- Loose items (`--set` in prose comments and in spans without a command, `--set loss.in_batch=
  true switches`): loaded into one shipped recipe of EVERY recipe class (command x `method:`);
  one that takes it is enough.
- Placeholder values (`PLACEHOLDER`): `<a|b|c>` loads each alternative; a whole-value `<...dir>`
  (path, file) an existing temporary directory; another whole-value placeholder (`<seed>`) the
  recipe's own value at that key (a value of the right kind); a placeholder inside a value
  (`runs/B-<mix>-s<seed>`) becomes `x`. The KEY is always the README's. Metavariables
  (`KEY=VALUE`, `NAME=DIR`) and `SYNTAX_EXAMPLES` are not keys and are skipped (a note).
- Prose items lose their trailing `,` `;` or unmatched `)` and their quotes (`--set
  "training.save_strategy='no'";` in a comment is `training.save_strategy='no'`).
- `training.*`: every loader refuses a key that is not a TrainingArguments field
  (`modeling.recipe.check_training_settings`; DPO's DPOConfig takes all of them), so a misspelt
  `training.max_step` fails here with the loader's "did you mean 'max_steps'".
"""

from __future__ import annotations

import contextlib
import copy
import functools
import glob
import io
import itertools
import json
import re
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import readme_commands
from readme_commands import Checker, Command, Extraction, Finding, Word, set_items, subparsers_of
from test_shipped_configs import COMMANDS, CONFIGS, REFERENCE, dry_run

from chatretriever.modeling.card_render import dotted_value
from chatretriever.modeling.recipe import resolved_recipe

# the extraction's `<...>` placeholders, and shell variables ($VAR, ${VAR})
PLACEHOLDER = re.compile(rf"{readme_commands.PLACEHOLDER.pattern}|\$\{{?\w+\}}?")
PATH_PLACEHOLDER = re.compile(r"dir|path|file", re.IGNORECASE)
METAVARIABLE = re.compile(r"^[A-Z][A-Z0-9_]*$")  # KEY=VALUE, NAME=DIR
SYNTAX_EXAMPLES = {"a.b=value": "the shape of a `--set` item, shown in a comment"}
_MISSING = object()


@functools.cache
def _raw_recipe(path: Path) -> dict:
    return resolved_recipe(path)


def raw_recipe(path: Path) -> dict:
    """The raw recipe of a file (its `base:` chain read), a fresh copy of one read."""
    return copy.deepcopy(_raw_recipe(path))


@dataclass
class SetCheck:
    """What the `--set` check found: findings, how many items it loaded, and notes on the items
    it loaded otherwise than into their own configs/ recipe, or skipped."""

    findings: list[Finding] = field(default_factory=list)
    checked: int = 0
    notes: list[str] = field(default_factory=list)


def item_text(word: Word) -> str:
    """A `--set` item as the shell would pass it (prose punctuation and quotes removed)."""
    text = word.text
    while text.endswith((",", ";")) or (text.endswith(")") and text.count(")") > text.count("(")):
        text = text[:-1]
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        with contextlib.suppress(ValueError):
            text = shlex.split(text)[0]
    return text


def variants(item: str, recipe: dict) -> list[tuple[str, str]]:
    """The items to load for a README item, placeholders replaced (module docstring), each with
    a note of what was put in (empty without a placeholder).

    Args:
        item: `key=value` as the README writes it.
        recipe: The raw recipe it overrides (`resolved_recipe`): its value at `key` is the
            stand-in of a whole-value placeholder of no other kind.

    Returns:
        [(item to load, note)].
    """
    key, _, value = item.partition("=")
    whole = PLACEHOLDER.fullmatch(value)
    if whole and "|" in value:
        return [(f"{key}={alt}", f"{value} as {alt}") for alt in value[1:-1].split("|")]
    if whole and PATH_PLACEHOLDER.search(value):
        stand_in = tempfile.gettempdir()  # exists; a dry run writes nothing
    elif whole:
        current = dotted_value(recipe, key, _MISSING)
        if current is _MISSING:
            return [(item, f"{value} kept as written: the recipe has no {key} to copy")]
        stand_in = json.dumps(current)  # JSON is YAML: the recipe's own value, its own kind
    elif PLACEHOLDER.search(value):
        stand_in = PLACEHOLDER.sub("x", value)
    else:
        return [(item, "")]
    return [(f"{key}={stand_in}", f"{value} as {stand_in}")]


def is_key(item: str) -> bool:
    key = item.partition("=")[0]
    return "=" in item and bool(key) and not METAVARIABLE.match(key) and item not in SYNTAX_EXAMPLES


class SetKeyChecker:
    """Loads the README's `--set` items through their commands' recipe loaders."""

    def __init__(self, checker: Checker) -> None:
        self.checker = checker
        self.root = checker.root
        self._loaded: dict[tuple[str, Path, tuple[str, ...]], str | None] = {}

    @cached_property
    def recipe_commands(self) -> frozenset[str]:
        """The subcommands that take `--set` (a recipe)."""
        choices = subparsers_of(self.checker.cli).choices
        return frozenset(n for n, p in choices.items() if "--set" in p._option_string_actions)

    @cached_property
    def classes(self) -> dict[str, tuple[str, Path]]:
        """One shipped recipe of each recipe class, {label: (command, path)}: the command's
        reference recipe where it is of that class, else the first top-level one by name."""
        groups: dict[str, tuple[str, Path]] = {}
        first = sorted(COMMANDS, key=lambda n: (n != REFERENCE[COMMANDS[n]], "/" in n, n))
        for name in first:
            command, path = COMMANDS[name], CONFIGS / name
            method = raw_recipe(path).get("method")
            groups.setdefault(f"{command} ({method})" if method else command, (command, path))
        return groups

    def check(self, extraction: Extraction) -> SetCheck:
        """Every finding on the `--set` items of an extraction (commands and loose ones)."""
        out = SetCheck()
        for command in extraction.commands:
            if command.kind == "cli" and set_items(command.args):
                self.check_command(command, out)
        for word in extraction.loose_sets:
            self.check_loose(word, out)
        out.findings = sorted(set(out.findings), key=lambda f: (f.line, f.problem))
        return out

    def relative(self, text: str) -> str:
        return text.replace(f"{self.root}/", "")

    def command_recipe(self, command: Command) -> tuple[str, str] | None:
        """(subcommand, recipe) as the CLI's parser reads the command; None when it is not a
        recipe command or does not parse (the option check reports what is wrong)."""
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                ns, _ = self.checker.cli.parse_known_args([w.text for w in command.args])
        except SystemExit:
            return None
        if ns.command not in self.recipe_commands:
            return None
        return ns.command, ns.recipe

    def check_command(self, command: Command, out: SetCheck) -> None:
        found = self.command_recipe(command)
        if found is None:
            return
        sub, recipe = found
        items = [w for w in set_items(command.args) if self.keep(w, out)]
        if not items:
            return
        pattern = PLACEHOLDER.sub("*", recipe)
        paths = sorted(Path(p) for p in glob.glob(str(self.root / pattern)))
        paths = [p for p in paths if p.is_file() and p.suffix == ".yaml"]
        if paths and pattern.startswith("configs/"):
            if pattern != recipe:
                names = ", ".join(p.relative_to(self.root).as_posix() for p in paths)
                out.notes.append(f"line {command.head.line}: {recipe} loaded as {names}")
            for path in paths:
                self.load_command(command, sub, path, items, out)
            return
        classes = [(label, path) for label, (c, path) in self.classes.items() if c == sub]
        labels = ", ".join(label for label, _ in classes)
        out.notes.append(
            f"line {command.head.line}: {recipe} is not a recipe of the repository: its --set "
            f"items loaded into the shipped {labels} recipes"
        )
        for word in items:
            self.load_anywhere(word, [(sub, path) for _, path in classes], command.text, out)

    def keep(self, word: Word, out: SetCheck) -> bool:
        """Whether an item names a key (a note says why one does not)."""
        text = item_text(word)
        if is_key(text):
            return True
        why = SYNTAX_EXAMPLES.get(text, "a metavariable")
        out.notes.append(f"line {word.line}: --set {word.text} skipped (not a key: {why})")
        return False

    def load(self, sub: str, path: Path, items: Sequence[str]) -> str | None:
        """The loader's error for the recipe with these items, None when it loads."""
        key = (sub, path, tuple(items))
        if key not in self._loaded:  # the README repeats items (each alternative, each class)
            run = dry_run(sub, path, *items)
            error = None if run.rc == 0 else self.relative(run.error.removeprefix("error: "))
            self._loaded[key] = error
        return self._loaded[key]

    def load_command(
        self, command: Command, sub: str, path: Path, items: Sequence[Word], out: SetCheck
    ) -> None:
        """Loads one recipe with every item of a command, for each placeholder alternative up
        to the first that fails (the others would repeat its findings)."""
        raw = raw_recipe(path)
        options = [variants(item_text(w), raw) for w in items]
        for chosen in itertools.product(*options):
            out.checked += len(items)
            texts = [text for text, _ in chosen]
            error = self.load(sub, path, texts)
            if error is None:
                continue
            # an item is tried alone, but with the `method=` items: they choose its class
            context = [t for t in texts if t.partition("=")[0] == "method"]
            blamed = False
            for word, (text, note) in zip(items, chosen, strict=True):
                alone = self.load(sub, path, [*(c for c in context if c != text), text])
                if alone is not None:
                    blamed = True
                    self.add(out, word, command.text, f"--set {word.text}: {alone}", note)
            if not blamed:
                self.add(out, items[0], command.text, f"with these --set items: {error}", "")
            return

    def check_loose(self, word: Word, out: SetCheck) -> None:
        if self.keep(word, out):
            self.load_anywhere(word, list(self.classes.values()), f"--set {word.text}", out)

    def load_anywhere(
        self, word: Word, targets: Sequence[tuple[str, Path]], command: str, out: SetCheck
    ) -> None:
        """One item into each target recipe until one loads it; a finding when none does."""
        out.checked += 1
        errors = []
        for sub, path in targets:
            loaded = [
                self.load(sub, path, [text])
                for text, _ in variants(item_text(word), raw_recipe(path))
            ]
            if all(error is None for error in loaded):
                return
            errors += [e for e in loaded if e is not None]
        shown = "\n    ".join(e[:200] for e in errors)
        self.add(
            out,
            word,
            command,
            f"--set {word.text}: no recipe it may belong to takes it:\n    {shown}",
            "",
        )

    def add(self, out: SetCheck, word: Word, command: str, problem: str, note: str) -> None:
        problem += f" (placeholder {note})" if note else ""
        out.findings.append(self.checker.finding(word, command, problem))
