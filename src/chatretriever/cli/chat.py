"""`chatretriever chat` (search a corpus index turn by turn) and `chatretriever demo`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator

from chatretriever.apps import registry
from chatretriever.cli.answer import add_answer_arguments
from chatretriever.cli.pipeline import add_hybrid_arguments, refuse_unused_hybrid_options
from chatretriever.retrieval.fusion import FUSION_METHODS

logger = logging.getLogger(__name__)

QUIT = (":quit", ":q", ":exit")
RESET = ":reset"
DEMO_BASELINE = "minilm-l6"  # the strongest session-free baseline on MTRAG-UN
HELP = "type a question; :reset starts a new conversation, :quit (or Ctrl-D) ends"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `chat` and `demo`."""
    p = sub.add_parser(
        "chat",
        help="type a conversation, see the top passages for all of it after every turn",
        description="Retrieves for the whole conversation so far (your turns only, and with "
        "--answer the answers written above the passages too). "
        f"{HELP}. When stdin is not a terminal, each line is one turn.",
    )
    p.add_argument("--index", required=True, help="index dir (from `index CORPUS --out DIR`)")
    p.add_argument("--model", help="query encoder (default: the model the index records)")
    p.add_argument("--corpus", help="corpus whose titles/texts to show (default: the index's copy)")
    p.add_argument("--k", type=int, default=5, help="passages shown per turn")
    p.add_argument("--snippet-chars", type=int, default=200, help="snippet length; 0: titles only")
    add_hybrid_arguments(p)
    g = p.add_argument_group("answers: a model writes an answer above the passages")
    g.add_argument(
        "--answer",
        action="store_true",
        help="answer every turn from the top passages (the index's UniConv, or --generator); "
        "the answers join the conversation",
    )
    add_answer_arguments(g)
    g.add_argument("--answer-k", type=int, default=3, help="top passages the answer reads")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "demo",
        help="the demo job: a model on whole conversations vs the baselines",
        description="Indexes the shipped demo corpus with --model, retrieves for every turn of "
        "the demo conversations with the whole session (model), the last turn (BM25), all user "
        "turns (--baseline, a session-free embedder) and the hybrid of the model and BM25, "
        "prints the top 3 of the model and BM25, a metrics table of all, and writes runs, "
        "results.json and metrics.png.",
    )
    p.add_argument("--model", help=f"the model (default: {registry.DEFAULT_MODEL})")
    p.add_argument("--out", default="outputs/demo", help="output directory")
    p.add_argument("--batch-size", type=int, default=16, help="passages/sessions per batch")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "auto"],
        default="fp32",
        help="model precision (default fp32: the same numbers on every machine; auto: bf16 "
        "where the CPU/GPU runs it natively, faster)",
    )
    p.add_argument(
        "--baseline",
        default=DEMO_BASELINE,
        help=f"session-free embedder searched with all user turns (default {DEMO_BASELINE}, "
        "skipped with a note when its weight package is missing; 'none': no such row)",
    )
    p.add_argument(
        "--hybrid",
        choices=[*FUSION_METHODS, "none"],
        default="linear",
        help="fusion of the model's session run and BM25's last-turn run (default linear)",
    )
    p.add_argument(
        "--fusion-weight", type=float, default=0.5, help="the model's weight in the hybrid"
    )
    p.set_defaults(func=cmd_demo)


def _echo(text: str = "") -> None:
    """Command output goes to stdout (logging and progress bars go to stderr)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _load_encoder(name: str):
    from chatretriever.apps.registry import load_encoder

    try:
        return load_encoder(name)
    except ImportError as e:  # a built-in model whose weight package is missing: one line
        raise ValueError(str(e)) from None


def _lines(interactive: bool) -> Iterator[str]:
    """The user's lines: prompted on a terminal, else read from stdin until EOF. Bytes that are
    not text come as lone surrogates (`errors="surrogateescape"`, see `_not_text`), so that one
    bad line cannot end the conversation."""
    if not interactive:
        raw = getattr(sys.stdin, "buffer", None)
        if raw is None:  # a text stream without bytes under it (io.StringIO)
            yield from sys.stdin
            return
        encoding = getattr(sys.stdin, "encoding", None) or "utf-8"
        for line in raw:
            yield line.decode(encoding, errors="surrogateescape")
        return
    while True:
        try:
            yield input("you> ")
        except UnicodeDecodeError as e:  # a strict terminal encoding: the line is gone
            _echo(f"(skipped: that line is not {e.encoding} text; type it again)")
        except (EOFError, KeyboardInterrupt):
            _echo()
            return


def _not_text(line: str) -> str | None:
    """Why a line cannot be a turn (a byte that is not text, a lone surrogate), or None."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(line[e.start])
        if 0xDC80 <= bad <= 0xDCFF:  # a byte that did not decode, kept by surrogateescape
            what = f"byte 0x{bad - 0xDC00:02x}, not {sys.stdin.encoding or 'utf-8'} text"
        else:
            what = f"a lone surrogate \\u{bad:04x}"
        return f"(skipped: the line holds {what}, at character {e.start + 1}; type it again)"
    return None


class _DropBpeCleanupNotice(logging.Filter):
    """Drops transformers' notice that it ignores `clean_up_tokenization_spaces=True` for a BPE
    tokenizer: printed between a turn and its first answer, about a setting of the model's
    tokenizer files that a chat user cannot change and that changes nothing (the cleanup is
    skipped either way)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Ignoring clean_up_tokenization_spaces")


def _quiet_answer_notices() -> None:
    """Install `_DropBpeCleanupNotice` on the logger that says it (once per process)."""
    said_by = logging.getLogger("transformers.tokenization_utils_tokenizers")
    if not any(isinstance(f, _DropBpeCleanupNotice) for f in said_by.filters):
        said_by.addFilter(_DropBpeCleanupNotice())


def _answerer(args: argparse.Namespace, corpus_index, encoder) -> tuple:
    """(answering model, its name, its answer_batch kwargs) of `--answer`, else (None, "", {})."""
    if not args.answer:
        if args.generator:
            raise ValueError("--generator names the model of --answer: add --answer")
        return None, "", {}
    from chatretriever.cli.answer import resolve_answerer

    if args.answer_k < 1 or args.max_new_tokens < 1:
        raise ValueError("--answer-k and --max-new-tokens must be positive")
    if corpus_index.passages is None:
        raise ValueError(f"{args.index} holds no passage texts to answer from: pass --corpus")
    _quiet_answer_notices()
    return resolve_answerer(encoder, args.generator, args.max_new_tokens, 1)


def _searcher(args: argparse.Namespace, corpus_index, encoder):
    from chatretriever.apps.chat import ChatSearcher

    hybrid = None
    if args.hybrid:
        from chatretriever.apps.chat import HybridSide
        from chatretriever.cli.pipeline import hybrid_side

        bm25, formulation, fusion, _ = hybrid_side(args, corpus_index)
        hybrid = HybridSide(bm25, formulation, fusion, args.fusion_depth)
    return ChatSearcher(encoder, corpus_index, k=args.k, hybrid=hybrid)


def cmd_chat(args: argparse.Namespace) -> int:
    from chatretriever.apps.chat import Conversation
    from chatretriever.apps.registry import match_precision, query_model
    from chatretriever.retrieval.corpus_index import CorpusIndex

    if args.k < 1 or args.snippet_chars < 0:
        raise ValueError("--k must be positive and --snippet-chars at least 0")
    refuse_unused_hybrid_options(args)
    corpus_index = CorpusIndex.load(args.index, corpus=args.corpus)
    model = query_model(args.model, corpus_index, args.index)
    if corpus_index.passages is None and not args.answer:
        logger.warning("%s holds no passage texts: showing ids (pass --corpus)", args.index)
    encoder = _load_encoder(model)
    match_precision(encoder, corpus_index.index.meta.fingerprint)
    answerer = _answerer(args, corpus_index, encoder)
    searcher = _searcher(args, corpus_index, encoder)
    interactive = sys.stdin.isatty()
    if interactive:
        how = f", hybrid {args.hybrid} with BM25" if args.hybrid else ""
        how += f", answers by {answerer[1]}" if answerer[0] is not None else ""
        _echo(f"chatretriever chat: {len(corpus_index.index)} passages, model {model}{how}")
        _echo(HELP)
    conversation = Conversation()
    for raw in _lines(interactive):
        line = raw.strip()
        if not line:
            continue
        if line in QUIT:
            break
        if line == RESET:
            conversation.reset()
            _echo("(new conversation)")
            continue
        if line.startswith(":"):
            _echo(f"unknown command {line!r}: {HELP}")
            continue
        problem = _not_text(line)
        if problem is not None:  # the tokenizer would fail on it: skip it, keep the conversation
            _echo(problem)
            continue
        _turn(args, searcher, answerer, conversation, line, interactive)
    return 0


def _turn(
    args: argparse.Namespace,
    searcher,
    answerer: tuple,
    conversation,
    line: str,
    interactive: bool,
) -> None:
    """Search (and answer) one user turn; prints the answer ABOVE the passages."""
    from chatretriever.apps.chat import answer_sessions, format_answer, format_hits, hit_passages

    session = conversation.add(line)
    hits = searcher.search(session)
    if not interactive:
        _echo(f"turn {conversation.user_turns}: {line}")
    model, _, kwargs = answerer
    if model is not None:
        item = (session, hit_passages(hits[: args.answer_k]))
        (answer,) = answer_sessions(model, [item], 1, model_kwargs=kwargs)
        conversation.add_answer(answer)
        _echo(format_answer(answer))
    _echo(format_hits(hits, snippet_chars=args.snippet_chars))
    _echo()


def cmd_demo(args: argparse.Namespace) -> int:
    from chatretriever.apps.demo import SHOWN, format_metrics, format_turn, load_demo_data, run_demo

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    model = args.model or registry.DEFAULT_MODEL
    data = load_demo_data()
    conversations = {s.id.split("::")[0] for s in data.sessions}
    _echo(
        f"demo: {len(data.passages)} passages, {len(data.sessions)} turns of "
        f"{len(conversations)} conversations; model {model} ({args.dtype}) -> {args.out}"
    )
    fusion = None
    if args.hybrid != "none":
        from chatretriever.retrieval.fusion import FusionConfig

        fusion = FusionConfig(args.hybrid, weight=args.fusion_weight)
    encoder = _load_encoder(model)
    baseline = None
    if args.baseline != "none":
        try:
            baseline = (args.baseline, _load_encoder(args.baseline))
        except ValueError as e:
            if args.baseline != DEMO_BASELINE:  # a name the user gave must load
                raise
            _echo(f"(no {args.baseline} row: {e})")  # the default's weights are not installed
    result = run_demo(
        encoder,
        model,
        args.out,
        data,
        batch_size=args.batch_size,
        dtype=args.dtype,
        baseline=baseline,
        fusion=fusion,
    )
    labels = list(result.evaluations)
    _echo(f"\ntop {SHOWN} per turn ('*' = judged relevant)\n")
    for turn in result.turns:
        _echo(format_turn(turn, labels))
        _echo()
    _echo(format_metrics(result.evaluations))
    _echo()
    for name, path in result.files.items():
        _echo(f"{name}: {path}")
    _echo(f"try it: chatretriever chat --index {result.index_dir}")
    return 0
