"""Pooling "eos" (UniConv's representation): the tokenizer's own end-of-sequence token is appended
to every input and its final hidden state is the embedding; no token is added to the vocabulary.
Config checks, the template's ids, pooling on either padding side and through the fast path, the
one-pass CSIT forward, save/load of an adapter, and a UniConv training run with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import build_tokenizer
from test_uniconv import _recipe, _rows

from chatretriever.config import LoraSettings, RetrieverConfig
from chatretriever.methods.chatretriever.model import ChatRetriever
from chatretriever.methods.uniconv.model import UniConv
from chatretriever.methods.uniconv.recipe import load_recipe, run_training
from chatretriever.modeling.collate import csit_batch
from chatretriever.modeling.fast_encode import FastEncodeSettings
from chatretriever.modeling.template import RetrievalTemplate, pooled_token_ids
from chatretriever.types import Passage

pytest.importorskip("peft")

SESSIONS = [
    [{"role": "user", "content": "what is the capital of france?"}],
    [
        {"role": "user", "content": "how do i reset my password?"},
        {"role": "assistant", "content": "open settings and choose reset."},
        {"role": "user", "content": "and in the cloud console? <|im_end|>"},
    ],
]
PASSAGES = [
    Passage(id="p1", title="Paris", text="paris is the capital of france."),
    Passage(id="p2", text="open settings and choose reset to reset your password."),
    Passage(id="p3", text="the quick brown fox jumps over the lazy dog 0123456789 " * 3),
]


def _eos_retriever(model_dir: Path, cls=ChatRetriever, **cfg):
    config = RetrieverConfig(
        n_emb_tokens=1, pooling="eos", dtype="fp32", max_session_len=96, max_passage_len=64, **cfg
    )
    lora = LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0)
    r = cls.from_pretrained(model_dir, config=config, lora=lora, device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter an effect
        for name, p in r.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return r.eval()


def test_config_needs_one_token_with_eos_pooling():
    assert RetrieverConfig(n_emb_tokens=1, pooling="eos").pooling == "eos"
    with pytest.raises(ValueError, match="n_emb_tokens must be 1"):
        RetrieverConfig(pooling="eos")  # the default t = 3
    with pytest.raises(ValueError, match="pooling"):
        RetrieverConfig(n_emb_tokens=1, pooling="mean")


def test_template_appends_the_eos_token_and_adds_none():
    tok = build_tokenizer()
    size = len(tok)
    eos = tok.eos_token_id
    template = RetrievalTemplate(tok, n_emb_tokens=1, pooling="eos", max_session_len=64)
    assert template.emb_ids == (eos,) and len(tok) == size
    ids = template.session_ids(SESSIONS[1])
    assert ids[-1] == eos
    # The typed "<|im_end|>" stays text: the eos ids are the template's turn ends and the last one.
    plain = template.session_ids(
        [*SESSIONS[1][:2], {"role": "user", "content": "and in the cloud console?"}]
    )
    assert ids.count(eos) == plain.count(eos)
    assert template.passage_ids(PASSAGES[0])[-1] == eos
    with pytest.raises(ValueError, match="no \\['\\[EMB_1\\]'\\]"):
        RetrievalTemplate(tok, n_emb_tokens=1)  # last_emb needs the added tokens
    with pytest.raises(ValueError, match="one token"):
        pooled_token_ids(tok, 2, "eos")
    tok.eos_token = None
    with pytest.raises(ValueError, match="end-of-sequence"):
        pooled_token_ids(tok, 1, "eos")


def test_eos_pooling_reads_the_last_hidden_state_on_either_side(tiny_model_dir):
    r = _eos_retriever(tiny_model_dir)
    base_rows = r.model.get_base_model().get_input_embeddings().weight.shape[0]
    assert base_rows == len(r.tokenizer)  # nothing added, nothing resized
    r.encode_settings = FastEncodeSettings(enabled=False)
    right = r.encode_passages(PASSAGES, batch_size=3)
    r.padding_side = "left"
    np.testing.assert_allclose(r.encode_passages(PASSAGES, batch_size=3), right, atol=1e-5)
    # The embedding is the final (normed) hidden state at the appended eos token.
    ids = torch.tensor([r.template.passage_ids(PASSAGES[2])])
    with torch.no_grad():
        hidden = r.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
    expected = torch.nn.functional.normalize(hidden.float(), dim=-1).numpy()
    np.testing.assert_allclose(right[2], expected, atol=1e-5)
    # The inference fast path (merged LoRA; padded, then packed rows) pools the same token.
    packed = FastEncodeSettings(pack=True, pack_len=128)
    for settings in (FastEncodeSettings(compile="off"), packed):
        r.encode_settings = settings
        np.testing.assert_allclose(r.encode_passages(PASSAGES, batch_size=3), right, atol=1e-4)


def test_one_csit_pass_gives_the_standalone_eos_embedding(tiny_llama_dir):
    r = _eos_retriever(tiny_llama_dir)
    standalone = r.encode_sessions(SESSIONS, batch_size=2)
    pieces = [r.template.csit_pieces(s, "a short reply.") for s in SESSIONS]
    assert all(p.n_emb == 1 and p.input_ids[p.session_emb_pos] == r.emb_ids[0] for p in pieces)
    with torch.no_grad():
        out = r.csit_forward(csit_batch(pieces, r.pad_id, mode="csit"))
    np.testing.assert_allclose(out["session_emb"].numpy(), standalone, atol=1e-4)


def test_an_eos_adapter_saves_and_loads_as_it_was(tiny_llama_dir, tmp_path):
    r = _eos_retriever(tiny_llama_dir)
    before = r.encode_sessions(SESSIONS)
    r.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / ChatRetriever.SAVED_CONFIG).read_text())
    assert meta["retriever"]["pooling"] == "eos"
    assert meta["emb_token_ids"] == [r.tokenizer.eos_token_id]
    adapter = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert not adapter.get("trainable_token_indices")  # no new rows to train or save
    loaded = ChatRetriever.from_pretrained(tmp_path / "m", device="cpu", dtype="fp32")
    assert loaded.config.pooling == "eos"
    np.testing.assert_allclose(loaded.encode_sessions(SESSIONS), before, atol=1e-5)
    with pytest.raises(ValueError, match="retriever.pooling"):
        ChatRetriever.from_pretrained(
            tmp_path / "m", device="cpu", pooling="last_emb", n_emb_tokens=1
        )
    # emb_init initialises added rows: under eos there are none, so it is neither checked nor
    # part of what the model is (an index of one serves the other's queries).
    other = ChatRetriever.from_pretrained(tmp_path / "m", device="cpu", emb_init="eos")
    assert other.config.emb_init == "eos" and other.fingerprint == loaded.fingerprint


def test_uniconv_trains_with_eos_pooling(tmp_path, tiny_llama_dir):
    path = _recipe(tmp_path, tiny_llama_dir)  # test_uniconv's 2-step recipe, then eos pooling
    recipe = yaml.safe_load(path.read_text())
    recipe["retriever"].update(n_emb_tokens=1, pooling="eos")
    path.write_text(yaml.safe_dump(recipe))
    base = UniConv.from_pretrained(tiny_llama_dir, config=load_recipe(path).retriever)
    out = run_training(load_recipe(path))
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(row["loss_retrieval"]) for row in log if "loss" in row)
    trained = UniConv.from_pretrained(out, device="cpu", dtype="fp32")
    assert trained.config.pooling == "eos" and trained.emb_ids == base.emb_ids
    assert len(trained.tokenizer) == len(base.tokenizer)
    session = _rows()[0]["messages"]
    assert not np.allclose(trained.encode_sessions([session]), base.encode_sessions([session]))
