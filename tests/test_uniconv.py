"""UniConv: the model (an Encoder that also answers), save/load, the one-pass CII forward against
separate forwards, the collator, the three named loss parts and their ablations, a training run
through the recipe and the CLI, and answering with retrieval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fixtures import write

from chatretriever.cli import main
from chatretriever.io.training import example_from_dict
from chatretriever.methods.uniconv.model import UniConv
from chatretriever.methods.uniconv.recipe import UniConvRecipe, load_recipe, run_training
from chatretriever.methods.uniconv.train import (
    UniConvLoss,
    UniConvSettings,
    has_reference,
    make_collator,
    uniconv_losses,
)
from chatretriever.modeling.grounded import grounded_messages
from chatretriever.modeling.grounded_fit import PromptFitter
from chatretriever.types import Passage

TOPICS = [
    ("cat", "Cats are small felines with whiskers."),
    ("sun", "The sun is a hot star."),
    ("oak", "Oaks are trees that grow acorns."),
    ("tea", "Tea is brewed from leaves."),
]


def _rows(with_target: bool = True) -> list[dict]:
    rows = []
    for i, (topic, text) in enumerate(TOPICS):
        rows.append(
            {
                "id": f"ex{i}",
                "messages": [
                    {"role": "user", "content": f"tell me about {topic}s"},
                    {"role": "assistant", "content": f"{topic}s are interesting."},
                    {"role": "user", "content": "what are they?"},
                ],
                "positives": [{"title": topic, "text": text}],
                "negatives": [{"text": TOPICS[(i + 1) % len(TOPICS)][1]}],
                "target": f"They are {topic} things." if with_target else None,
                "source": "matched" if with_target else "mismatched",
            }
        )
    return rows


def _recipe(tmp_path: Path, model_dir: Path, uniconv: dict | None = None, loss: dict | None = None):
    data = write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in _rows()) + "\n")
    recipe = {
        "method": "uniconv",
        "model": str(model_dir),
        "output_dir": str(tmp_path / "run"),
        "retriever": {"max_session_len": 64, "max_passage_len": 32, "max_response_len": 16},
        "loss": {"alpha": 1.0, "temperature": 0.05, "n_hard_negatives": 1, **(loss or {})},
        "uniconv": {"alpha": 0.5, "cii_negatives": 2, "max_context_tokens": 96, **(uniconv or {})},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"files": [{"path": str(data)}]},
        "training": {
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "learning_rate": 5e-3,
            "warmup_steps": 0,
            "save_steps": 2,
            "logging_steps": 1,
            "use_cpu": True,
            "dataloader_num_workers": 0,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _model(tmp_path, model_dir) -> tuple[UniConv, UniConvRecipe]:
    cfg = load_recipe(_recipe(tmp_path, model_dir))
    model = UniConv.from_pretrained(
        cfg.model, config=cfg.retriever, lora=cfg.lora, device="cpu", dtype="fp32"
    )
    # LoRA B starts at 0: move it so that the adapter changes what the model computes.
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval(), cfg


def _separate_loglik(model: UniConv, context: list[int], response: list[int]) -> float:
    """Mean log-probability of `response` after `context`, from a plain causal forward."""
    ids = torch.tensor([context + response])
    with torch.no_grad():
        logits = model.model(input_ids=ids).logits[0].float()  # (L, V)
    logp = torch.log_softmax(logits, -1)
    c = len(context)
    return float(np.mean([logp[c - 1 + t, tok].item() for t, tok in enumerate(response)]))


def test_cii_forward_equals_separate_forwards(tmp_path, tiny_model_dir):
    model, cfg = _model(tmp_path, tiny_model_dir)
    collate = make_collator(model, cfg.loss, cfg.uniconv)
    examples = [example_from_dict(r) for r in _rows()[:3]]
    batch = collate(examples)
    cii = batch["cii"]
    assert cii.n_candidates == 3 and cii.candidate_mask.all()  # own + 2 others
    with torch.no_grad():
        scores = model.cii_forward(cii)  # (3, 3)
    tok = model.tokenizer
    for i in range(3):
        row = cii.input_ids[i].tolist()
        for k in range(3):
            start, end = _spans(cii, i)[k]
            context = row[: _spans(cii, i)[0][0]]
            expected = _separate_loglik(model, context, row[start:end])
            assert scores[i, k].item() == pytest.approx(expected, abs=1e-4)
    # candidate 0 is the example's own reference, ending with the stop token
    start, end = _spans(cii, 0)[0]
    assert cii.input_ids[0, end - 1].item() == tok.eos_token_id
    assert "They are cat things." in tok.decode(cii.input_ids[0, start:end])
    # the context is the grounded prompt of the session and its positive
    # with its title, as `answer` shows a passage ("[1] title: text")
    positive = examples[0].positives[0]
    shown = Passage("p", positive.text, title=positive.title)
    prompt = grounded_messages(list(examples[0].messages), [shown], 800)
    assert "[1] cat: Cats are small felines" in prompt[-1]["content"]
    # fitted to max_context_tokens as `answer` fits a prompt: system message kept, no raw cut
    ctx_ids = PromptFitter(tok).fit_batch([prompt], 96)[0]
    assert len(ctx_ids) <= 96 and tok.decode(ctx_ids).startswith("<|im_start|>system\nAnswer")
    assert cii.input_ids[0, : len(ctx_ids)].tolist() == ctx_ids


def _spans(cii, i: int) -> list[tuple[int, int]]:
    """(start, end) of each candidate of row i: the first token of every candidate is predicted
    from the last context position, and the candidates follow the context one after another."""
    k = cii.n_candidates
    sel = [(cii.pred_rows == i) & (cii.segment == i * k + j) for j in range(k)]
    firsts = {int(cii.pred_pos[s].min()) for s in sel}
    assert len(firsts) == 1  # shared
    start, spans = firsts.pop() + 1, []
    for s in sel:
        spans.append((start, start + int(s.sum())))
        start += int(s.sum())
    return spans


def test_collator_leaves_examples_without_reference_out_of_cii(tmp_path, tiny_llama_dir):
    model, cfg = _model(tmp_path, tiny_llama_dir)
    rows = _rows()[:2] + _rows(with_target=False)[2:]
    examples = [example_from_dict(r) for r in rows]
    assert [has_reference(e) for e in examples] == [True, True, False, False]
    batch = make_collator(model, cfg.loss, cfg.uniconv)(examples)
    assert batch["cii_rows"] == [0, 1]
    assert batch["cii"].input_ids.shape[0] == 2 and batch["cii"].n_candidates == 2
    # one example with a reference: nothing to contrast it with
    single = make_collator(model, cfg.loss, cfg.uniconv)(examples[1:])
    assert single["cii"] is None


@pytest.mark.parametrize(
    ("settings", "loss_alpha", "parts"),
    [
        ({}, 1.0, {"retrieval", "generation", "cii"}),
        ({"alpha": 0.0}, 1.0, {"retrieval", "generation"}),  # w/o CII
        ({"alpha": 0.0}, 0.0, {"retrieval"}),  # retrieval-only
        ({"retrieval_weight": 0.0}, 1.0, {"generation", "cii"}),  # generation-only
        ({"cii_score": "embedding"}, 1.0, {"retrieval", "generation", "cii"}),
        ({"grounded_weight": 1.0}, 1.0, {"retrieval", "generation", "cii", "grounded"}),
        ({"alpha": 0.0, "grounded_weight": 1.0}, 1.0, {"retrieval", "generation", "grounded"}),
    ],
)
def test_loss_parts_and_ablations(tmp_path, tiny_llama_dir, settings, loss_alpha, parts):
    model, cfg = _model(tmp_path, tiny_llama_dir)
    loss = type(cfg.loss)(**{**cfg.loss.to_dict(), "alpha": loss_alpha})
    uc = UniConvSettings(**{**cfg.uniconv.__dict__, **settings})
    batch = make_collator(model, loss, uc)([example_from_dict(r) for r in _rows()])
    out = uniconv_losses(model.train(), batch, loss, uc)
    assert set(out) == parts
    assert all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()  # every part reaches the trained weights
    grads = [p.grad for n, p in model.model.named_parameters() if "lora_" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_generation_part_is_a_token_mean_over_the_tokens_it_counts(tmp_path, tiny_llama_dir):
    """L_G names its tokens to the trainer (`token_counts`: a step's L_G is then the mean over
    all of its tokens, accumulated or across processes): exactly the labels the forward
    predicts; none without L_G."""
    model, cfg = _model(tmp_path, tiny_llama_dir)
    batch = make_collator(model, cfg.loss, cfg.uniconv)([example_from_dict(r) for r in _rows()])
    with torch.no_grad():
        out = model(sessions=batch["sessions"], passages=batch["passages"])
    counted = UniConvLoss(cfg.loss, cfg.uniconv).token_counts(batch)
    assert set(counted) == {"generation"} and int(counted["generation"]) == len(out["lm_labels"])
    assert len(out["lm_labels"]) > 0
    no_lm = type(cfg.loss)(**{**cfg.loss.to_dict(), "alpha": 0.0})
    assert UniConvLoss(no_lm, cfg.uniconv).token_counts(batch) == {}


def test_cii_part_is_alpha_times_the_hand_computed_loss(tmp_path, tiny_llama_dir):
    model, cfg = _model(tmp_path, tiny_llama_dir)
    batch = make_collator(model, cfg.loss, cfg.uniconv)([example_from_dict(r) for r in _rows()])
    with torch.no_grad():
        out = uniconv_losses(model, batch, cfg.loss, cfg.uniconv)
        scores = model.cii_forward(batch["cii"])  # (B, K), column 0 = the reference
    expected = (-torch.log_softmax(scores, -1)[:, 0]).mean()
    assert out["cii"].item() == pytest.approx(cfg.uniconv.alpha * expected.item(), rel=1e-5)


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_grounded_part_is_the_reference_nll_after_the_grounded_prompt(
    tmp_path, tiny_llama_dir, normalize
):
    model, cfg = _model(tmp_path, tiny_llama_dir)
    uc = UniConvSettings(
        **{**cfg.uniconv.__dict__, "grounded_weight": 0.7, "cii_normalize": normalize}
    )
    examples = [example_from_dict(r) for r in _rows()]
    batch = make_collator(model, cfg.loss, uc)(examples)
    with torch.no_grad():
        out = uniconv_losses(model, batch, cfg.loss, uc)
    cii = batch["cii"]
    nll = []
    for i in range(len(examples)):
        row = cii.input_ids[i].tolist()
        (start, end) = _spans(cii, i)[0]
        nll.append(-_separate_loglik(model, row[:start], row[start:end]))
    # the token mean per reference, whatever L_CII's normalisation; the mean over examples
    assert out["grounded"].item() == pytest.approx(0.7 * float(np.mean(nll)), rel=1e-4)


def test_grounded_part_alone_needs_no_other_reference(tmp_path, tiny_llama_dir):
    model, cfg = _model(tmp_path, tiny_llama_dir)
    uc = UniConvSettings(**{**cfg.uniconv.__dict__, "alpha": 0.0, "grounded_weight": 1.0})
    rows = _rows()[:1] + _rows(with_target=False)[1:]
    batch = make_collator(model, cfg.loss, uc)([example_from_dict(r) for r in rows])
    assert batch["cii_rows"] == [0] and batch["cii"].n_candidates == 1  # the reference only
    out = uniconv_losses(model, batch, cfg.loss, uc)
    assert set(out) == {"retrieval", "generation", "grounded"} and out["grounded"].item() > 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"grounded_weight": -1.0}, "must be >= 0"),
        ({"grounded_weight": 1.0, "cii_score": "embedding"}, "needs uniconv.cii_score: likelihood"),
    ],
)
def test_grounded_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        UniConvSettings(**settings)


def test_training_run_save_load_and_answer(tmp_path, tiny_llama_dir, capsys):
    path = _recipe(tmp_path, tiny_llama_dir)
    assert main(["train", str(path), "--dry-run"]) == 0
    assert "uniconv:" in capsys.readouterr().out
    out = run_training(load_recipe(path))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 2
    for row in steps:
        for part in ("retrieval", "generation", "cii"):
            assert np.isfinite(row[f"loss_{part}"])
    meta = json.loads((out / "uniconv.json").read_text())
    assert meta["method"] == "uniconv" and meta["format"] == "adapter"
    assert not (out / "chatretriever.json").exists()
    size = sum(f.stat().st_size for f in out.glob("adapter_model.safetensors"))
    assert 0 < size < 5_000_000
    a = UniConv.from_pretrained(out, device="cpu", dtype="fp32")
    b = UniConv.from_pretrained(out, device="cpu", dtype="fp32")
    session = _rows()[0]["messages"]
    np.testing.assert_allclose(a.encode_sessions([session]), b.encode_sessions([session]))
    assert a.fingerprint == b.fingerprint and a.name.startswith("uniconv/")
    passages = [TOPICS[0][1]]
    first = a.answer(session, passages, max_new_tokens=5)
    assert first == b.answer(session, passages, max_new_tokens=5)  # greedy: deterministic
    assert a.answer_batch([(session, passages)] * 2, max_new_tokens=5) == [first, first]


def test_answer_with_retrieval_uses_its_own_embeddings(tmp_path, tiny_llama_dir):
    pytest.importorskip("faiss")
    from chatretriever.io.embeddings import EmbeddingMeta, write_embeddings
    from chatretriever.retrieval.corpus_index import CorpusIndex
    from chatretriever.retrieval.index import DenseIndex, EncoderMismatchError
    from chatretriever.types import Passage

    model, _ = _model(tmp_path, tiny_llama_dir)
    passages = {
        f"d{i}": Passage(f"d{i}", text, title=topic) for i, (topic, text) in enumerate(TOPICS)
    }
    emb = model.encode_passages(list(passages.values()))

    def index_of(fingerprint):
        meta = EmbeddingMeta(model.name, model.dim, fingerprint=fingerprint)
        return DenseIndex.build(
            [write_embeddings(tmp_path / fingerprint, list(passages), emb, meta)]
        )

    index = index_of(model.fingerprint)
    session = _rows()[1]["messages"]
    answer, hits = model.answer_with_retrieval(
        session, index, k=2, passages=passages, max_new_tokens=4
    )
    q = model.encode_sessions([session])[0]
    best = sorted(passages, key=lambda d: -float(emb[list(passages).index(d)] @ q))[:2]
    assert [pid for pid, _ in hits] == best
    assert answer == model.answer(session, [passages[d] for d in best], max_new_tokens=4)
    # a CorpusIndex carrying the passages, and passages given as a list, answer alike
    corpus_index = CorpusIndex(index, model.name, passages)
    assert model.answer_with_retrieval(session, corpus_index, k=2, max_new_tokens=4) == (
        answer,
        hits,
    )
    listed = list(passages.values())
    assert model.answer_with_retrieval(session, index, k=2, passages=listed, max_new_tokens=4) == (
        answer,
        hits,
    )
    with pytest.raises(ValueError, match="passages"):
        model.answer_with_retrieval(session, index, k=1)
    # a question string is a one-turn session (it was read one character per message)
    question = "Tell me about the sun."
    one_turn = [{"role": "user", "content": question}]
    assert model.answer_with_retrieval(question, corpus_index, k=2, max_new_tokens=4) == (
        model.answer_with_retrieval(one_turn, corpus_index, k=2, max_new_tokens=4)
    )
    assert model.answer(question, listed[:1], max_new_tokens=4) == model.answer(
        one_turn, listed[:1], max_new_tokens=4
    )
    with pytest.raises(ValueError, match="k must be at least 1"):
        model.answer_with_retrieval(session, index, k=0, passages=passages)
    with pytest.raises(TypeError, match=r"items\[0\] passages must be a list of passages"):
        model.answer(session, "Jaguars live in the Americas.")  # one passage a character
    with pytest.raises(EncoderMismatchError):  # another model's passage vectors
        model.answer_with_retrieval(session, index_of("other-model"), k=1, passages=passages)


def test_uniconv_starts_from_a_saved_chatretriever(tmp_path, tiny_llama_dir):
    """`uniconv-smol` starts from `chatretriever-smol`: a UniConv recipe's `model` may be a saved
    ChatRetriever; its adapter and EMB rows are loaded (same embeddings), and the run saves a
    UniConv. The other way round is refused (a ChatRetriever does not read uniconv.json)."""
    from chatretriever import ChatRetriever

    cfg = load_recipe(_recipe(tmp_path, tiny_llama_dir))
    retriever = ChatRetriever.from_pretrained(
        tiny_llama_dir, config=cfg.retriever, lora=cfg.lora, device="cpu", dtype="fp32"
    )
    with torch.no_grad():
        for name, p in retriever.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    saved = retriever.save_pretrained(tmp_path / "csit")
    uni = UniConv.from_pretrained(saved, device="cpu", dtype="fp32")
    session = _rows()[0]["messages"]
    np.testing.assert_allclose(
        uni.encode_sessions([session]), retriever.encode_sessions([session]), atol=1e-5
    )
    assert uni.name.startswith("uniconv/")

    path = _recipe(tmp_path, saved)
    out = run_training(load_recipe(path))
    assert (out / "uniconv.json").is_file() and not (out / "chatretriever.json").exists()
    base = json.loads((out / "uniconv.json").read_text())["retriever"]["base_model"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    trained = UniConv.from_pretrained(out, device="cpu", dtype="fp32")
    assert not np.allclose(trained.encode_sessions([session]), uni.encode_sessions([session]))
    # adapter_config.json names the base as the config does (a built-in name, not the cache dir)
    trained.config.base_model = "tiny-base-by-name"
    again = trained.save_pretrained(tmp_path / "renamed")
    config = json.loads((again / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-base-by-name"
    with pytest.raises(ValueError, match="saved uniconv model"):
        ChatRetriever.from_pretrained(out, device="cpu", dtype="fp32")
