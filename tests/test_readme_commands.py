"""The README's commands name subcommands, options, make targets and files that exist (the
extractor's rules: tests/readme_commands.py)."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
from readme_commands import README, ROOT, Checker, Finding, extract, flags_of

# --- tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checker() -> Checker:
    return Checker(ROOT, README.read_text().split("\n"))


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


def test_readme_commands_exist(checker: Checker) -> None:
    findings = checker.check(extract(README.read_text(), checker.subcommands))

    assert not findings, "stale README commands:\n" + "\n".join(map(str, findings))
