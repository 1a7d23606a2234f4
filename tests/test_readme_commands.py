"""The README's commands name subcommands, options, make targets and files that exist (the
extractor's rules: tests/readme_commands.py), and each of their `--set KEY=VALUE` items loads
into the recipe it overrides, through its command's own loader (tests/readme_set_keys.py)."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
from readme_commands import README, ROOT, Checker, Extraction, Finding, Word, extract, flags_of
from readme_set_keys import SetCheck, SetKeyChecker, item_text

# --- tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checker() -> Checker:
    return Checker(ROOT, README.read_text().split("\n"))


@pytest.fixture(scope="module")
def set_checker(checker: Checker) -> SetKeyChecker:
    return SetKeyChecker(checker)


@pytest.fixture(scope="module")
def readme(checker: Checker) -> Extraction:
    return extract(README.read_text(), checker.subcommands)


def check_text(checker: Checker, text: str) -> list[Finding]:
    """Findings of a markdown snippet, against the real CLI and scripts."""
    snippet = copy.copy(checker)  # the same parsers, built once
    snippet.lines = text.split("\n")
    return snippet.check(extract(text, checker.subcommands))


SNIPPET = """intro `chatretriever search --index idx/
--sessions s.jsonl` and `encode --dtype fp32`, `--fusion-weight`.

```
OMP_NUM_THREADS=2 chatretriever search --index idx/ --sessions s.jsonl \\
    --formulation last_turn --out run.trec   # --rewrite-field KEY: another rewrite
chatretriever data corpus knowledge.json --out k.jsonl --granularity document
printf 'q\\n' | chatretriever chat --index idx/ > out.txt 2>&1
torchrun --nproc_per_node 2 -m chatretriever train configs/chatretriever-smol.yaml --resume
python benchmarks/rationale.py quality --rerank-limit 5 \\
    --student a=b
make demo    # = chatretriever demo --model minilm-l6 \\
             #   --hybrid rrf
chatretriever robustness ... --llm-rewrite
  --contexts 5 --modes full
```
"""


def test_extract_reads_continuations_comments_and_shell_pieces(checker: Checker) -> None:
    ex = extract(SNIPPET, checker.subcommands)
    by_head = [(c.kind, c.text) for c in ex.commands]
    assert ("cli", "chatretriever chat --index idx/") in by_head  # pipe, redirections dropped
    search = next(c for c in ex.commands if c.text.startswith("chatretriever search --index idx/ "))
    assert [w.line for w in flags_of(search.args)] == [5, 5, 6, 6]  # continuation, comment cut
    assert "--rewrite-field" not in search.text
    assert [c.module for c in ex.commands if c.module] == ["chatretriever"]
    demo = next(c for c in ex.commands if c.text.startswith("chatretriever demo"))
    assert [w.text for w in flags_of(demo.args)] == ["--model", "--hybrid"]  # `#` continued
    rob = next(c for c in ex.commands if c.text.startswith("chatretriever robustness"))
    assert [w.text for w in flags_of(rob.args)] == ["--llm-rewrite", "--contexts", "--modes"]
    spans = [c.text for c in ex.commands if c.head.line in (1, 2)]
    assert spans == [
        "chatretriever search --index idx/ --sessions s.jsonl",
        "chatretriever encode --dtype fp32",
    ]
    assert [w.text for w in ex.loose_flags] == ["--rewrite-field", "--fusion-weight"]
    assert check_text(checker, SNIPPET) == []  # every name in it exists today


def test_unknown_names_are_reported_with_their_line(checker: Checker) -> None:
    text = """```
chatretriever data corpus knowledge.json --out k.jsonl \\
    --documents d.json
chatretriever serch --index idx/
python benchmarks/rationale.py cost --rerank-limit 5
python benchmarks/rationale.py --reranker a=b
python benchmarks/nope.py --out x
make demo tset
chatretriever train configs/nope.yaml   # see --no-such-flag
```
"""
    found = [(f.line, f.problem) for f in check_text(checker, text)]
    names, cost_quality = checker.subcommands, "(one of cost, quality)"
    assert found == [
        (3, "unknown option --documents of `chatretriever data corpus`"),
        (4, f"unknown subcommand 'serch' of `chatretriever` ({', '.join(sorted(names))})"),
        (5, "unknown option --rerank-limit of `benchmarks/rationale.py cost`"),
        (6, "--reranker: `benchmarks/rationale.py` needs its subcommand first " + cost_quality),
        (7, "no such benchmark script"),
        (8, "make: no target 'tset' in the Makefile"),
        (9, "--no-such-flag: no chatretriever subcommand or benchmark takes it"),
        (9, "no such path: configs/nope.yaml"),
    ]


def test_a_stale_flag_in_a_readme_snippet_fails(checker: Checker) -> None:
    lines = README.read_text().split("\n")
    start = next(i for i, t in enumerate(lines) if t.startswith("chatretriever search --bm25"))
    snippet = ["```", *lines[start - 1 : start + 2], "```"]
    assert check_text(checker, "\n".join(snippet)) == []
    snippet[2] = snippet[2].replace("--formulation", "--formulation-typo")
    findings = check_text(checker, "\n".join(snippet))
    hint = "(did you mean --formulation?)"
    assert [(f.line, f.problem) for f in findings] == [
        (3, "unknown option --formulation-typo of `chatretriever search` " + hint)
    ]
    assert "README line 3: `chatretriever search --bm25" in str(findings[0])


def test_readme_extraction_finds_the_commands(checker: Checker) -> None:
    """Guards against a vacuous pass: the README's commands are all still seen."""
    ex = extract(README.read_text(), checker.subcommands)
    kinds = Counter(c.kind for c in ex.commands)
    assert kinds["cli"] >= 100 and kinds["bench"] >= 30 and kinds["make"] >= 15, kinds


def test_readme_commands_exist(checker: Checker, readme: Extraction) -> None:
    findings = checker.check(readme)

    assert not findings, "stale README commands:\n" + "\n".join(map(str, findings))


# --- `--set` items load into their recipes (tests/readme_set_keys.py) ---------------------------


def check_sets(set_checker: SetKeyChecker, text: str) -> SetCheck:
    """The `--set` check of a markdown snippet, against the real loaders and configs/."""
    snippet = copy.copy(set_checker)  # the recipe classes, found once
    snippet.checker = copy.copy(set_checker.checker)
    snippet.checker.lines = text.split("\n")
    return snippet.check(extract(text, set_checker.checker.subcommands))


SET_SNIPPET = """`--set loss.in_bach=true` switches it on; `--set rank_weight=0` turns it off.

```
chatretriever train configs/chatretriever-smol.yaml --set training.max_steps=3 \\
    --set training.max_step=3 --set retriever.max_sesion_len=100
chatretriever train configs/datamix/<mix>.yaml --set model=<v1 dir> \\
    --set training.seed=<42|1|2> --set output_dir=runs/B-<mix>-s<seed>
chatretriever rerank-distill outputs/mine.yaml --set data.limt=5   # --set KEY=VALUE
torchrun -m chatretriever train configs/uniconv-smol.yaml --set uniconv.alpah=0
chatretriever train configs/chatretriever-smol.yaml --set method=uniconv --set uniconv.alpha=0
```
"""


def test_a_misspelt_set_key_is_reported_with_its_line(set_checker: SetKeyChecker) -> None:
    result = check_sets(set_checker, SET_SNIPPET)
    found = [(f.line, f.problem.split(":")[0]) for f in result.findings]
    assert found == [
        (1, "--set loss.in_bach=true"),  # a loose item: no recipe class takes it
        (5, "--set retriever.max_sesion_len=100"),
        (5, "--set training.max_step=3"),
        (8, "--set data.limt=5"),
        (9, "--set uniconv.alpah=0"),
    ]
    problems = {f.problem.split(":")[0]: f for f in result.findings}
    step = problems["--set training.max_step=3"]
    assert "training.max_step: not a TrainingArguments field; did you mean 'max_steps'?" in str(
        step
    )
    assert str(step).startswith("README line 5: `chatretriever train configs/chatretriever-smol")
    assert (
        "configs/chatretriever-smol.yaml: RetrieverConfig: unknown field(s) ['max_sesion_len']"
        in (problems["--set retriever.max_sesion_len=100"].problem)
    )
    assert "DistillData: unknown field(s) ['limt']" in problems["--set data.limt=5"].problem
    assert (
        "UniConvSettings: unknown field(s) ['alpah']" in problems["--set uniconv.alpah=0"].problem
    )
    # items loaded: 3 on line 4, 3 x 4 datamix files x 3 seeds, 1, 1, 2, and the 2 loose ones
    assert result.checked == 3 + 3 * 4 * 3 + 1 + 1 + 2 + 2
    mixes = ("answers", "distill", "passages", "topiocqa-uncapped")
    assert result.notes == [
        "line 6: configs/datamix/<mix>.yaml loaded as "
        + ", ".join(f"configs/datamix/{m}.yaml" for m in mixes),
        "line 8: outputs/mine.yaml is not a recipe of the repository: its --set items loaded "
        "into the shipped rerank-distill recipes",
        "line 8: --set KEY=VALUE skipped (not a key: a metavariable)",
    ]


def test_a_placeholder_value_keeps_its_key_checked(set_checker: SetKeyChecker) -> None:
    text = """```
chatretriever train configs/datamix/<mix>.yaml --set training.sed=<42|1|2> \\
    --set model=<v1 dir> --set output_dir=runs/B-<mix>-s<seed>
```"""
    result = check_sets(set_checker, text)
    refused = [f.problem.split(": ", 2)[1] for f in result.findings]
    assert refused == [
        f"configs/datamix/{m}.yaml" for m in ("answers", "distill", "passages", "topiocqa-uncapped")
    ]
    assert all(
        f.line == 2 and "training.sed: not a TrainingArguments field" in f.problem
        for f in result.findings
    )
    assert all(f.problem.endswith("(placeholder <42|1|2> as 42)") for f in result.findings)


@pytest.mark.parametrize(
    ("text", "item"),
    [
        ("\"training.save_strategy='no'\";", "training.save_strategy='no'"),
        ("output_dir=runs/v1-s<seed>,", "output_dir=runs/v1-s<seed>"),
        ("output_dir=runs/x)", "output_dir=runs/x"),
        ("data.files=[{path: a}]", "data.files=[{path: a}]"),
    ],
)
def test_a_prose_item_is_read_as_the_shell_passes_it(text: str, item: str) -> None:
    assert item_text(Word(text, 1)) == item


def test_readme_set_items_load(set_checker: SetKeyChecker, readme: Extraction) -> None:
    result = set_checker.check(readme)

    assert result.checked >= 60, result  # guards against a vacuous pass
    assert not result.findings, "README --set items refused by their recipes:\n" + "\n".join(
        map(str, result.findings)
    )
