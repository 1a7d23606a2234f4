"""`chatretriever answer`, `chat --answer`, the grounded-answer helpers of `apps.chat`, and the
helpers of benchmarks/rag.py, with fake retrievers and fake generators (no model, no network)."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
from fakes import HashEncoder
from fixtures import jsonl, write

from chatretriever.apps.chat import (
    Conversation,
    answer_sessions,
    format_answer,
    generation_kwargs,
    top_passages,
)
from chatretriever.apps.registry import load_encoder, register_encoder, unregister_encoder
from chatretriever.cli import main
from chatretriever.types import Passage, Run, Session, Turn

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

CORPUS = [
    {"_id": "diet", "title": "Jaguar diet", "text": "jaguars eat deer capybaras and caimans"},
    {"_id": "range", "title": "Jaguar range", "text": "jaguars live in the rainforests"},
    {"_id": "pasta", "title": "Pasta", "text": "cook pasta in salted water with tomato sauce"},
    {"_id": "owls", "title": "Owls", "text": "owls hunt mice at night"},
]
SESSIONS = [
    {"id": "s1", "messages": [{"role": "user", "content": "what do jaguars eat"}]},
    {"id": "s2", "messages": [{"role": "user", "content": "how do I cook pasta"}]},
    {
        "id": "s3",
        "messages": [
            {"role": "user", "content": "tell me about owls"},
            {"role": "assistant", "content": "owls are birds"},
            {"role": "user", "content": "when do owls hunt mice"},
        ],
    },
]


class AnsweringEncoder(HashEncoder):
    """A fake UniConv: hashed bag-of-words retrieval, and answers that name their passages."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[dict] = []

    def answer_batch(self, items, max_new_tokens=96, batch_size=8):
        self.calls.append({"items": list(items), "max_new_tokens": max_new_tokens})
        return [f"{s.question} <- {','.join(p.id for p in ps) or 'nothing'}" for s, ps in items]


class FakeGenerator:
    """A fake GroundedGenerator: reads (turns, passages), answers with the last turn."""

    def __init__(self) -> None:
        self.items: list = []

    def answer_batch(self, items, **kwargs):
        self.items.extend(items)
        return [f"gen: {turns[-1].content} [{len(ps)}]" for turns, ps in items]


@pytest.fixture
def models():
    """`fakeuni:` loads one shared AnsweringEncoder, `fake:` a HashEncoder that cannot answer."""
    made: dict[str, HashEncoder] = {}
    register_encoder("fakeuni", lambda rest: made.setdefault("uni", AnsweringEncoder(name="uni")))
    register_encoder("fake", lambda rest: made.setdefault("plain", HashEncoder(name="plain")))
    yield made
    unregister_encoder("fakeuni")
    unregister_encoder("fake")


@pytest.fixture
def generator(monkeypatch):
    """`--generator NAME` loads one FakeGenerator; the load arguments are recorded."""
    gen = FakeGenerator()
    gen.loaded = []

    def load(name, max_new_tokens, batch_size):
        gen.loaded.append((name, max_new_tokens, batch_size))
        return gen

    monkeypatch.setattr("chatretriever.cli.answer.load_generator", load)
    return gen


def _index(tmp_path: Path, model: str) -> Path:
    pytest.importorskip("faiss")
    corpus = write(tmp_path / "corpus.jsonl", jsonl(CORPUS))
    out = tmp_path / f"idx-{model.rstrip(':')}"
    assert main(["index", str(corpus), "--out", str(out), "--model", model]) == 0
    return out


def _sessions(tmp_path: Path) -> Path:
    return write(tmp_path / "sessions.jsonl", jsonl(SESSIONS))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------ answer command
def test_answer_retrieves_and_answers_with_the_index_model(tmp_path, models, capsys):
    index = _index(tmp_path, "fakeuni:")
    out = tmp_path / "answers.jsonl"
    argv = ["answer", "--index", str(index), "--sessions", str(_sessions(tmp_path))]
    argv += ["--out", str(out), "--k", "2", "--batch-size", "2", "--max-new-tokens", "7"]
    assert main(argv) == 0
    rows = _rows(out)
    assert [r["qid"] for r in rows] == ["s1", "s2", "s3"]  # the sessions' order
    # the two words of s1 shared with "diet" ("jaguars", "eat") beat the one shared with "range"
    assert rows[0]["passages"] == ["diet", "range"]
    assert rows[1]["passages"][0] == "pasta" and rows[2]["passages"][0] == "owls"
    assert rows[0]["answer"] == "what do jaguars eat <- diet,range"
    assert rows[2]["answer"] == f"when do owls hunt mice <- {','.join(rows[2]['passages'])}"
    uni = models["uni"]
    # calls of --batch-size sessions, each with --max-new-tokens; the model reads whole sessions
    assert [len(c["items"]) for c in uni.calls] == [2, 1]
    assert {c["max_new_tokens"] for c in uni.calls} == {7}
    s3 = next(s for c in uni.calls for s, _ in c["items"] if s.id == "s3")
    assert [t.role for t in s3.turns] == ["user", "assistant", "user"]
    settings = json.loads((tmp_path / "answers.jsonl.settings.json").read_text())
    assert settings["answerer"] == "uni" and settings["k"] == 2 and settings["sessions_count"] == 3
    assert "3 answers by uni (top 2 passages)" in capsys.readouterr().out


def test_answer_with_a_generator_reads_turns(tmp_path, models, generator):
    index = _index(tmp_path, "fake:")
    out = tmp_path / "a.jsonl"
    argv = ["answer", "--index", str(index), "--sessions", str(_sessions(tmp_path))]
    assert main([*argv, "--out", str(out), "--generator", "tiny-llm"]) == 0
    assert generator.loaded == [("tiny-llm", 96, 8)]
    rows = _rows(out)
    assert [r["answer"] for r in rows] == [
        "gen: what do jaguars eat [3]",
        "gen: how do I cook pasta [3]",
        "gen: when do owls hunt mice [3]",
    ]
    turns, passages = next(i for i in generator.items if i[0][-1].content.startswith("when"))
    assert turns == (
        Turn("user", "tell me about owls"),
        Turn("assistant", "owls are birds"),
        Turn("user", "when do owls hunt mice"),
    )
    assert [p.id for p in passages] == rows[2]["passages"] and passages[0].title == "Owls"


def test_answer_without_a_model_that_answers_is_a_one_line_error(tmp_path, models, capsys):
    index = _index(tmp_path, "fake:")
    out = tmp_path / "a.jsonl"
    argv = ["answer", "--index", str(index), "--sessions", str(_sessions(tmp_path))]
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the index's model 'plain' does not write answers")
    assert "--generator NAME" in err and "\n" not in err
    assert not out.exists()
    assert models["plain"].sessions_encoded == 0  # refused before any retrieval


def test_closed_book_answers_read_no_passages(tmp_path, models, generator, capsys):
    out = tmp_path / "a.jsonl"
    argv = ["answer", "--sessions", str(_sessions(tmp_path)), "--out", str(out), "--closed-book"]
    assert main([*argv, "--generator", "tiny-llm"]) == 0  # no index needed
    assert [r["passages"] for r in _rows(out)] == [[], [], []]
    assert [len(ps) for _, ps in generator.items] == [0, 0, 0]
    capsys.readouterr()
    assert main(argv) == 2  # nothing to answer with
    assert "give --index DIR" in capsys.readouterr().err
    # a UniConv index answers closed book with itself, and retrieves nothing
    index = _index(tmp_path, "fakeuni:")
    assert main([*argv, "--index", str(index)]) == 0
    assert models["uni"].sessions_encoded == 0
    assert _rows(out)[0]["answer"] == "what do jaguars eat <- nothing"


# --------------------------------------------------------------------------------- chat --answer
def _chat(monkeypatch, capsys, index: Path, lines: str, *extra: str) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    capsys.readouterr()
    assert main(["chat", "--index", str(index), "--k", "3", *extra]) == 0
    return capsys.readouterr().out


def test_chat_answer_prints_the_answer_above_the_passages(tmp_path, models, monkeypatch, capsys):
    index = _index(tmp_path, "fakeuni:")
    out = _chat(
        monkeypatch,
        capsys,
        index,
        "what do jaguars eat\nand where\n",
        "--answer",
        "--answer-k",
        "1",
    )
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0] == "turn 1: what do jaguars eat"
    assert lines[1] == "  answer: what do jaguars eat <- diet"  # reads the top --answer-k
    assert lines[2].lstrip().startswith("1. [") and lines[2].endswith("Jaguar diet (diet)")
    second = lines.index("turn 2: and where")
    assert lines[second + 1].startswith("  answer: and where <- ")
    assert lines[second + 2].lstrip().startswith("1. [")
    # the answer joined the conversation: the second turn's session holds it
    ((session, passages),) = models["uni"].calls[-1]["items"]
    assert [t.role for t in session.turns] == ["user", "assistant", "user"]
    assert session.turns[1].content == "what do jaguars eat <- diet" and len(passages) == 1


def test_chat_answer_with_a_generator_and_its_errors(
    tmp_path, models, generator, monkeypatch, capsys
):
    index = _index(tmp_path, "fake:")
    out = _chat(monkeypatch, capsys, index, "how do I cook pasta\n", "--answer", "--generator", "g")
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[:2] == ["turn 1: how do I cook pasta", "  answer: gen: how do I cook pasta [3]"]
    assert lines[2].endswith("Pasta (pasta)")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    capsys.readouterr()
    assert main(["chat", "--index", str(index), "--answer"]) == 2  # plain retriever, no generator
    assert "--generator NAME" in capsys.readouterr().err
    assert main(["chat", "--index", str(index), "--generator", "g"]) == 2
    assert "add --answer" in capsys.readouterr().err


# ------------------------------------------------------------------------- answer helpers
def test_answer_sessions_batches_longest_first_and_keeps_input_order():
    uni = AnsweringEncoder()
    p = Passage("p", "x" * 50)
    items = [
        (Session("a", (Turn("user", "a"),)), []),
        (Session("b", (Turn("user", "b"),)), [p]),
        (Session("c", (Turn("user", "c" * 10),)), []),
    ]
    answers = answer_sessions(uni, items, 2, model_kwargs={"max_new_tokens": 5})
    assert answers == ["a <- nothing", "b <- p", "cccccccccc <- nothing"]
    # prompt characters: b 51, c 10, a 1 -> batches [b, c], [a]
    assert [[s.id for s, _ in c["items"]] for c in uni.calls] == [["b", "c"], ["a"]]
    assert generation_kwargs(uni, 5, 4) == {"max_new_tokens": 5, "batch_size": 4}
    assert generation_kwargs(FakeGenerator(), 5, 4) == {}  # a generator has them as settings
    gen = FakeGenerator()
    assert answer_sessions(gen, items[:1]) == ["gen: a [0]"]
    assert gen.items == [((Turn("user", "a"),), [])]  # a generator reads turns, not sessions
    with pytest.raises(ValueError, match="batch_size"):
        answer_sessions(gen, items, batch_size=0)


def test_top_passages_ranks_by_score_then_id():
    passages = {i: Passage(i, f"text {i}") for i in ("a", "b", "c")}
    run = Run({"q": {"c": 1.0, "b": 2.0, "a": 2.0}, "r": {}})
    top = top_passages(run, passages, 2)
    assert {q: [p.id for p in ps] for q, ps in top.items()} == {"q": ["a", "b"], "r": []}
    with pytest.raises(ValueError, match="no text for retrieved passage 'z'"):
        top_passages(Run({"q": {"z": 1.0}}), passages, 2)


def test_conversation_answers_and_format_answer():
    c = Conversation()
    with pytest.raises(ValueError, match="follows a user turn"):
        c.add_answer("too early")
    c.add("hi")
    c.add_answer(" hello ")
    c.add("more")
    assert [t.role for t in c.session().turns] == ["user", "assistant", "user"]
    assert c.user_turns == 2 and c.session().turns[1].content == "hello"
    text = format_answer("one two three four five six", width=22)
    assert text.splitlines() == ["  answer: one two", "    three four five", "    six"]
    assert format_answer("  ") == "  answer: (empty answer)"


def test_load_encoder_loads_a_uniconv_directory(tmp_path, monkeypatch):
    from chatretriever.methods.uniconv import model

    loaded = []
    monkeypatch.setattr(
        model.UniConv, "from_pretrained", classmethod(lambda cls, n: loaded.append(n) or "U")
    )
    (tmp_path / "uniconv.json").write_text("{}")
    assert load_encoder(str(tmp_path)) == "U" and loaded == [str(tmp_path)]


# ------------------------------------------------------------------------- benchmarks/rag.py
@pytest.fixture(scope="module")
def rag():
    spec = importlib.util.spec_from_file_location("benchmarks_rag", BENCHMARKS / "rag.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_pool_holds_every_judged_passage_and_the_bm25_top(rag):
    judged = {"q1": {"a": 1, "b": 0}, "q2": {"c": 2}}
    hits = {"q1": ["a", "d", "e"], "q2": ["f", "g", "h"], "q3": ["i"]}
    # judged a, b (rel 0 too), c; BM25 top 2: a, d / f, g / i
    assert rag.pool_ids(judged, hits, 2) == {"a", "b", "c", "d", "f", "g", "i"}
    assert rag.pool_ids(judged, {}, 5) == {"a", "b", "c"}


def test_select_turns_and_oracle_run(rag):
    def s(qid, response="r"):
        return Session(qid, (Turn("user", "q"),), response=response)

    sessions = [s("c2<::>1"), s("c1<::>3"), s("c1<::>2", None), s("c1<::>1"), s("c3<::>1")]
    ids = [t.id for t in rag.select_turns(sessions, {"c1", "c2"}, limit=0)]
    assert ids == ["c1<::>1", "c1<::>3", "c2<::>1"]  # sorted, with a response, chosen convs
    # limit: the 2 ids of lowest sha1 (c2<::>1 3a49..., c3<::>1 53d2...; then c1<::>3 5687...),
    # not the first two by id; a larger limit keeps them
    assert [t.id for t in rag.select_turns(sessions, None, limit=2)] == ["c2<::>1", "c3<::>1"]
    three = [t.id for t in rag.select_turns(sessions, None, limit=3)]
    assert three == ["c1<::>3", "c2<::>1", "c3<::>1"]
    run = rag.oracle_run({"q": {"a": 1, "b": 2, "c": 0}}, ["q", "r"])
    assert [d.doc_id for d in run.ranked("q")] == ["b", "a"] and run.scores["r"] == {}


def test_results_table_and_corpus_line(rag):
    records = [
        {
            "id": "decoupled",
            "metrics": {"nDCG@3": 0.5, "R@10": 0.75, "F1": 0.25, "ROUGE-L": 0.2},
            "consistency": {"hit": {"n": 3, "f1": 0.4}, "miss": {"n": 1, "f1": None}},
            "n": 5,
        },
        {
            "id": "closed-book",
            "metrics": {"nDCG@3": None, "R@10": None, "F1": 0.125, "ROUGE-L": 0.1},
            "consistency": None,
            "n": 5,
        },
    ]
    assert rag.results_table(records).splitlines() == [
        "| system | nDCG@3 | R@10 | F1 | ROUGE-L | F1 hit / miss (n) | n |",
        "|---|---|---|---|---|---|---|",
        "| decoupled | 0.5000 | 0.7500 | 0.2500 | 0.2000 | 0.4000 / - (3/1) | 5 |",
        "| closed-book | - | - | 0.1250 | 0.1000 | - | 5 |",
    ]
    pooled = {"pooled": True, "passages": 1234, "full_passages": 38000, "depth": 20}
    line = rag.corpus_line(pooled, 40)
    assert line.startswith("Corpus: POOLED, 1,234 of 38,000 passages") and "top 20" in line
    full = rag.corpus_line({"pooled": False, "passages": 38000}, 40)
    assert full == "Corpus: the full MTRAG corpus, 38,000 passages."


def test_paired_tests_against_the_baseline_row(rag):
    base = {"id": "decoupled", "per_turn": {"F1": {"a": 0.5, "b": 0.25}, "nDCG@3": {"a": 1.0}}}
    uni = {
        "id": "uniconv",
        "per_turn": {"F1": {"a": 0.75, "b": 0.5, "c": 0.9}, "nDCG@3": {"a": 0.5}},
    }
    closed = {"id": "closed-book", "per_turn": {"F1": {"a": 0.5, "b": 0.25}}}
    assert rag.paired_tests([uni, base, closed], "no-such-row") is None
    assert rag.paired_tests([uni, base, closed], "decoupled") == "decoupled"
    # turn c has no baseline value: left out; +0.25 on both common turns, and with two turns
    # only the all-same-sign flips (2 of 4) are as extreme: p ~ 0.5
    f1 = uni["paired"]["F1"]
    assert f1["diff"] == pytest.approx(0.25) and f1["n"] == 2 and 0.4 < f1["p"] < 0.6
    assert uni["paired"]["nDCG@3"]["diff"] == pytest.approx(-0.5)
    assert closed["paired"] == {"F1": {"diff": 0.0, "p": 1.0, "n": 2}}  # identical: p = 1
    assert base["paired"] == {}
    records = [
        {**r, "metrics": dict.fromkeys(("nDCG@3", "R@10", "F1", "ROUGE-L"), 0.5), "n": 2}
        for r in (base, uni)
    ]
    # only the given rows, under another key: the ablation comparison
    assert rag.paired_tests([uni, base, closed], "uniconv", "paired_ablation", {"closed-book"})
    assert "paired_ablation" not in base and "paired_ablation" not in uni
    assert closed["paired_ablation"]["F1"]["diff"] == pytest.approx(-0.25)
    table = rag.ablation_table(
        [
            {**r, "metrics": {"nDCG@3": None, "F1": 0.5, "ROUGE-L": 0.25}}
            for r in (base, uni, closed)
        ],
        "uniconv",
    ).splitlines()
    assert table[0] == (
        "| system | nDCG@3 | F1 | ROUGE-L | ΔnDCG@3 vs uniconv (p) | ΔF1 vs uniconv (p) |"
    )
    assert [line.split(" | ")[0] for line in table[2:]] == ["| uniconv", "| closed-book"]
    assert table[3].startswith("| closed-book | - | 0.5000 | 0.2500 | - | -0.2500 (")
    lines = rag.results_table(records, "decoupled").splitlines()
    assert lines[0].endswith("| ΔnDCG@3 vs decoupled (p) | ΔF1 vs decoupled (p) |")
    assert (
        lines[2].endswith("| - | - |") and "| -0.5000 (" in lines[3] and "| +0.2500 (" in lines[3]
    )


def test_plan_systems(rag):
    args = rag.parse_args(
        ["--systems", "uniconv", "bm25", "oracle", "--ablation", "no-cii=/x", "--generator", "g"]
    )
    planned, skipped = rag.plan_systems(args)
    assert [s.id for s in planned] == ["bm25", "oracle", "no-cii"]
    assert skipped == [{"system": "uniconv", "reason": "no --uniconv DIR given"}]
    assert planned[2].answerer == "self" and planned[2].run_id == "no-cii.session"
    assert planned[0].run_id == "bm25.last_turn" and planned[1].run_id is None
    args = rag.parse_args(
        ["--systems", "decoupled", "retriever-as-generator", "--retriever", "r", "--generator", "g"]
    )
    a, b = rag.plan_systems(args)[0]
    assert a.run_id == b.run_id == "r.session"  # one run shared by both rows
    assert (a.answerer, a.generator, b.answerer) == ("llm", "g", "retriever-lm")
    assert rag.describe(b, 3) == "r's LM answers from top 3 of r (whole session)"


MTRAG_CORPUS = [
    {**p, "domain": "clapnq"}
    for p in [*CORPUS, {"_id": "cars", "title": "Cars", "text": "the jaguar car company"}]
]


def _task(conv: str, turn: int, messages: list[tuple[str, str]], response: str) -> dict:
    return {
        "conversation_id": conv,
        "task_id": f"{conv}<::>{turn}",
        "turn": str(turn),
        "input": [{"speaker": s, "text": t} for s, t in messages],
        "targets": [{"text": response}],
        "Collection": "mt-clapnq",
    }


@pytest.fixture
def mtrag(tmp_path):
    root = tmp_path / "mtrag"
    write(root / "corpus.jsonl.gz", jsonl(MTRAG_CORPUS))
    tasks = [
        _task("c1", 1, [("user", "what do jaguars eat")], "jaguars eat deer"),
        _task(
            "c2",
            2,
            [
                ("user", "tell me about owls"),
                ("agent", "owls are birds"),
                ("user", "when do owls hunt"),
            ],
            "owls hunt at night",
        ),
        _task("c3", 1, [("user", "how do I cook pasta")], "in salted water"),  # not held out
    ]
    write(root / "mtrag-un" / "reference.jsonl", jsonl(tasks))
    qrels = "query-id\tcorpus-id\tscore\nc1<::>1\tdiet\t1\nc1<::>1\trange\t0\nc2<::>2\towls\t2\n"
    write(root / "mtrag-un" / "qrels" / "clapnq.tsv", qrels)
    write(tmp_path / "heldout.txt", "# held out\nc1\nc2\n")
    return root


def test_rag_benchmark_end_to_end_then_from_its_caches(rag, mtrag, tmp_path, models, monkeypatch):
    pytest.importorskip("bm25s")
    pytest.importorskip("ir_measures")
    pytest.importorskip("rouge_score")
    from chatretriever.modeling.grounded import GroundedGenerator

    gen, loads = FakeGenerator(), []
    monkeypatch.setattr(
        GroundedGenerator,
        "from_pretrained",
        classmethod(lambda cls, name, *a, **kw: loads.append(name) or gen),
    )
    monkeypatch.setattr(rag.backends, "have_faiss", lambda: False)  # the numpy search path
    out = tmp_path / "out"
    argv = ["--data", str(mtrag), "--out", str(out), "--eval-conversations"]
    argv += [str(tmp_path / "heldout.txt"), "--pool", "1", "--uniconv", "fakeuni:", "--systems"]
    argv += ["uniconv", "decoupled", "bm25", "closed-book", "oracle", "--retriever", "fake:hash"]
    argv += ["--generator", "g"]
    assert rag.main(argv) == 0
    result = json.loads((out / "rag.json").read_text())
    # judged diet, range, owls + BM25's top 1 (diet, owls): 3 of the 5 passages
    assert result["corpus"] == {
        "pooled": True,
        "full_passages": 5,
        "tag": result["corpus"]["tag"],
        "passages": 3,
        "depth": 1,
    }
    assert result["turns"] == 2 and [s["id"] for s in result["systems"]] == [
        "uniconv",
        "decoupled",
        "bm25",
        "closed-book",
        "oracle",
    ]
    rows = {s["id"]: s for s in result["systems"]}
    # closed book: "gen: what do jaguars eat [0]" vs "jaguars eat deer": 2 common tokens of 6
    # and 3 -> F1 = 2 (1/3)(2/3) / (1/3 + 2/3) = 4/9; "gen: when do owls hunt [0]" vs "owls hunt
    # at night": 2 of 6 and 4 -> F1 = 2 (1/3)(1/2) / (5/6) = 2/5; mean (4/9 + 2/5) / 2 = 19/45
    assert rows["closed-book"]["metrics"]["F1"] == pytest.approx(19 / 45)
    assert (
        rows["closed-book"]["metrics"]["nDCG@3"] is None
        and rows["closed-book"]["consistency"] is None
    )
    oracle = {r["qid"]: r["passages"] for r in _rows(Path(rows["oracle"]["answers"]["answers"]))}
    assert oracle == {"c1<::>1": ["diet"], "c2<::>2": ["owls"]}  # rel > 0 only
    # BM25 on the last turn puts the relevant passage first for both turns: nDCG@3 = R@10 = 1
    assert rows["bm25"]["metrics"]["nDCG@3"] == pytest.approx(1.0)
    assert rows["bm25"]["metrics"]["R@10"] == pytest.approx(1.0)
    assert (
        rows["bm25"]["consistency"]["hit"]["n"] == 2
        and rows["bm25"]["consistency"]["miss"]["n"] == 0
    )
    uni = _rows(Path(rows["uniconv"]["answers"]["answers"]))
    assert uni[0]["answer"].startswith("what do jaguars eat <- ") and len(uni[0]["passages"]) == 3
    assert loads == ["g"]  # one generator for the three rows that use it
    md = (out / "rag.md").read_text()
    assert "Corpus: POOLED, 3 of 5 passages" in md and "| closed-book | - | - |" in md
    assert (out / "rag.png").stat().st_size > 0
    # a rerun reads every run and answer from the caches: no model answers again
    answered = len(gen.items), len(models["uni"].calls)
    assert rag.main(argv) == 0
    assert (len(gen.items), len(models["uni"].calls)) == answered and loads == ["g"]
    again = json.loads((out / "rag.json").read_text())
    assert [s["metrics"] for s in again["systems"]] == [s["metrics"] for s in result["systems"]]
    assert all(s["answers"]["cached"] for s in again["systems"])
    # bf16 answers are not float32 ones: the generator rows answer again, loaded in bf16
    dtypes = []
    monkeypatch.setattr(
        GroundedGenerator,
        "from_pretrained",
        classmethod(lambda cls, name, *a, **kw: dtypes.append(kw.get("dtype")) or gen),
    )
    assert rag.main([*argv, "--gen-dtype", "bf16"]) == 0
    bf16 = {
        s["id"]: s["answers"]["cached"]
        for s in json.loads((out / "rag.json").read_text())["systems"]
    }
    assert bf16 == {
        "uniconv": True,
        "decoupled": False,
        "bm25": False,
        "closed-book": False,
        "oracle": False,
    }
    assert dtypes == ["bf16"] and json.loads((out / "rag.json").read_text())["gen_dtype"] == "bf16"
    # another rule for fitting long prompts: every row answers again (not the old cut's answers)
    import chatretriever.modeling.grounded_fit as grounded_fit

    rule = grounded_fit.FIT_RULE
    monkeypatch.setattr(grounded_fit, "FIT_RULE", rule + "-other")
    assert rag.main([*argv, "--gen-dtype", "bf16"]) == 0
    systems = json.loads((out / "rag.json").read_text())["systems"]
    assert not any(s["answers"]["cached"] for s in systems)
    monkeypatch.setattr(grounded_fit, "FIT_RULE", rule)
    # an ablation row is also compared with the row it ablates (here the same model: diff 0)
    assert rag.main([*argv, "--ablation", "same=fakeuni:"]) == 0
    result = json.loads((out / "rag.json").read_text())
    rows = {s["id"]: s for s in result["systems"]}
    assert result["ablations_against"] == "uniconv" and "paired_ablation" not in rows["bm25"]
    assert rows["same"]["paired_ablation"]["F1"] == {"diff": 0.0, "p": 1.0, "n": 2}
    assert rows["same"]["paired"]["F1"]["n"] == 2  # and against decoupled, as every row
    md = (out / "rag.md").read_text()
    assert "Ablations against `uniconv`:" in md and "| same | 1.0000 |" in md
    # a baseline that is none of the rows, or an --ablation without NAME=: refused before any work
    with pytest.raises(ValueError, match=r"--ablation-baseline 'nope' is none of the rows \["):
        rag.main([*argv, "--ablation", "same=fakeuni:", "--ablation-baseline", "nope"])
    with pytest.raises(ValueError, match="--ablation 'fakeuni:': expected NAME=DIR"):
        rag.main([*argv, "--ablation", "fakeuni:"])


def test_rag_answers_are_cached_per_turn_and_kept_when_interrupted(
    rag, mtrag, tmp_path, models, monkeypatch, capsys
):
    pytest.importorskip("bm25s")
    pytest.importorskip("rouge_score")
    from chatretriever.modeling.grounded import GroundedGenerator

    gen = FakeGenerator()
    monkeypatch.setattr(
        GroundedGenerator, "from_pretrained", classmethod(lambda cls, *a, **kw: gen)
    )
    out = tmp_path / "out"
    argv = ["--data", str(mtrag), "--out", str(out), "--eval-conversations", "", "--systems"]
    argv += ["closed-book", "--generator", "g", "--gen-batch-size", "1"]

    def answers() -> dict[str, str]:
        (path,) = (out / "answers").glob("closed-book*.jsonl")
        return {r["qid"]: r["answer"] for r in _rows(path)}

    assert rag.main([*argv, "--limit", "1"]) == 0 and len(gen.items) == 1
    first = answers()
    assert rag.main([*argv, "--limit", "3"]) == 0  # the cached turn is reused, two added
    assert len(gen.items) == 3 and len(answers()) == 3 and first.items() <= answers().items()
    record = json.loads((out / "rag.json").read_text())["systems"][0]["answers"]
    assert (record["reused"], record["generated"], record["cached"]) == (1, 2, False)
    assert rag.main([*argv, "--limit", "2"]) == 0 and len(gen.items) == 3  # a subset: all cached
    assert len(answers()) == 3  # the cache never shrinks
    # interrupted in its second batch: the first batch's answer is on disk, one line is printed
    for path in (out / "answers").glob("closed-book.*"):
        path.unlink()
    calls = []

    def answer_then_stop(items, **kwargs):
        calls.append(items)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [f"answer {len(calls)}" for _ in items]

    monkeypatch.setattr(gen, "answer_batch", answer_then_stop)
    capsys.readouterr()
    assert rag.main([*argv, "--limit", "3"]) == rag.script.INTERRUPTED
    assert answers() and list(answers().values()) == ["answer 1"]
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("interrupted: the answers so far are kept in")
    monkeypatch.setattr(gen, "answer_batch", FakeGenerator().answer_batch)
    calls.clear()
    assert rag.main([*argv, "--limit", "3"]) == 0 and len(answers()) == 3
    assert "answer 1" in answers().values()  # resumed: the kept answer is not asked again


def test_rag_without_judged_turns_scores_generation_only(rag, mtrag, tmp_path, models, monkeypatch):
    pytest.importorskip("bm25s")
    pytest.importorskip("rouge_score")
    from chatretriever.modeling.grounded import GroundedGenerator

    monkeypatch.setattr(
        GroundedGenerator, "from_pretrained", classmethod(lambda cls, *a, **kw: FakeGenerator())
    )
    write(tmp_path / "c3.txt", "c3\n")  # c3's turn has a response and no judgment
    out = tmp_path / "out"
    argv = ["--data", str(mtrag), "--out", str(out), "--eval-conversations"]
    argv += [str(tmp_path / "c3.txt"), "--systems", "bm25", "--generator", "g"]
    assert rag.main(argv) == 0
    (row,) = json.loads((out / "rag.json").read_text())["systems"]
    assert row["metrics"]["nDCG@3"] is None and row["metrics"]["F1"] is not None
    assert "| bm25 | - | - |" in (out / "rag.md").read_text()
