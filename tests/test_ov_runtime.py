"""OpenVINO as a runtime of the encoder fast path: the same embeddings as the torch copy, the
same batching, a cached body, the runtime in the metadata, the CLI flag and the missing extra."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from chatretriever.errors import MissingExtraError
from chatretriever.modeling.fast_encode import RUNTIMES, FastEncodeSettings, encode_ids
from chatretriever.modeling.ov_runtime import (
    RunnerBody,
    check_device,
    openvino_body,
    precision_hint,
)
from chatretriever.types import Passage

pytest.importorskip("peft")

PASSAGES = [
    Passage(id="p1", title="Paris", text="paris is the capital of france."),
    Passage(id="p2", text="open settings and choose reset to reset your password."),
    Passage(id="p3", text="the quick brown fox jumps over the lazy dog 0123456789 " * 3),
    Passage(id="p4", text="a"),
]
SESSIONS = [
    [{"role": "user", "content": "what is the capital of france?"}],
    [
        {"role": "user", "content": "how do i reset my password?"},
        {"role": "assistant", "content": "open settings and choose reset."},
        {"role": "user", "content": "and in the cloud console?"},
    ],
]
OV = FastEncodeSettings(runtime="openvino")


@pytest.fixture
def ov():
    return pytest.importorskip("openvino")


@pytest.fixture
def retriever(tiny_llama_dir):
    from chatretriever.methods.chatretriever.model import ChatRetriever

    r = ChatRetriever.from_pretrained(tiny_llama_dir, dtype="fp32", device="cpu")
    _perturb(r)
    return r


def _perturb(r, seed: int = 0) -> None:
    """Non-zero LoRA B matrices and EMB rows, so that a body without them would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in r.model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _encode(r, settings: FastEncodeSettings | None) -> tuple[np.ndarray, np.ndarray]:
    r.encode_settings = settings
    return r.encode_passages(PASSAGES, batch_size=2), r.encode_sessions(SESSIONS, batch_size=2)


# ------------------------------------------------------------------ without openvino
def test_settings_validate_the_runtime():
    assert RUNTIMES == ("torch", "openvino")
    assert FastEncodeSettings().runtime == "torch"
    assert OV.to_dict()["runtime"] == "openvino"
    with pytest.raises(ValueError, match="runtime must be one of"):
        FastEncodeSettings(runtime="onnx")
    with pytest.raises(ValueError, match="does not pack"):
        FastEncodeSettings(runtime="openvino", pack=True)


def test_cli_choices_are_the_settings_runtimes():
    from chatretriever.cli.pipeline import RUNTIMES as CLI_RUNTIMES

    assert CLI_RUNTIMES == RUNTIMES


def test_precision_hint_and_device_check():
    assert precision_hint(torch.bfloat16) == "bf16"
    assert precision_hint(torch.float32) == "f32"
    check_device(torch.device("cpu"))
    with pytest.raises(ValueError, match="runs on the CPU"):
        check_device(torch.device("cuda", 0))
    # A GPU model is refused before anything is converted (openvino or not).
    with pytest.raises(ValueError, match="runs on the CPU, the model is on meta"):
        openvino_body(torch.nn.Linear(2, 2, device="meta"), 0, torch.float32)


def test_a_runner_body_is_batched_and_pooled_like_the_torch_copy():
    shapes = []

    def run(batch):  # hidden state of each position: (its id, its position, its mask)
        shapes.append(batch["input_ids"].shape)
        assert all(v.dtype == np.int64 for v in batch.values())
        parts = [batch[k] for k in ("input_ids", "position_ids", "attention_mask")]
        return np.stack(parts, axis=-1).astype(np.float32)  # (B, L, 3)

    seqs = [[5, 9, 7], [9, 1], [3, 9, 4, 9, 2, 8], [9]]  # pool id 9: last at 1, 0, 3, 0
    settings = FastEncodeSettings(token_budget=12, max_batch=8)
    out = encode_ids(RunnerBody(run), seqs, pad_id=0, pool_id=9, settings=settings, max_batch=8)
    np.testing.assert_array_equal(out.numpy(), [[9, 1, 1], [9, 0, 1], [9, 3, 1], [9, 0, 1]])
    # Longest first within a 12-token budget: 6 + 3 (2 x 6 = 12), then 2 + 1 (padded to 2).
    assert shapes == [(2, 6), (2, 2)]


def test_asking_for_openvino_without_it_names_the_extra(retriever, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails
    retriever.encode_settings = OV
    with pytest.raises(MissingExtraError) as err:
        retriever.encode_passages(PASSAGES[:1])
    assert (err.value.module, err.value.extra) == ("openvino", "openvino")
    assert str(err.value) == (
        "the OpenVINO runtime needs openvino, which is not installed: "
        "pip install 'chatretriever[openvino]'"
    )


def test_cli_refuses_openvino_for_an_encoder_that_is_no_llm(tmp_path, capsys):
    from fakes import HashEncoder

    from chatretriever.apps.registry import register_encoder, unregister_encoder
    from chatretriever.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "a", "text": "jaguars eat deer"}) + "\n")
    register_encoder("ovfake", lambda rest: HashEncoder(name="fake-hash"))
    try:
        argv = ["encode", str(corpus), "--model", "ovfake:", "--out", str(tmp_path / "emb")]
        assert main([*argv, "--runtime", "openvino"]) == 2
        assert "--runtime openvino runs ChatRetriever/UniConv models, not fake-hash" in (
            capsys.readouterr().err
        )
        assert not (tmp_path / "emb").exists()
        assert main(argv) == 0  # the default runtime (torch) leaves any encoder as it is
    finally:
        unregister_encoder("ovfake")


def test_encode_index_and_serve_take_runtime_and_torch_leaves_an_llm_as_it_is(
    retriever, monkeypatch, capsys
):
    from chatretriever.cli import build_parser
    from chatretriever.cli.pipeline import set_runtime

    parser = build_parser()
    for argv in (
        ["encode", "c.jsonl", "--model", "m", "--out", "o"],
        ["index", "c.jsonl", "--out", "o"],
        ["serve", "--index", "i"],
    ):
        assert parser.parse_args(argv).runtime == "torch"
        assert parser.parse_args([*argv, "--runtime", "openvino"]).runtime == "openvino"
        with pytest.raises(SystemExit) as stop:
            parser.parse_args([*argv, "--runtime", "onnx"])
        assert stop.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err
    retriever.encode_settings = FastEncodeSettings(token_budget=512)
    set_runtime(retriever, "torch")
    assert retriever.encode_settings == FastEncodeSettings(token_budget=512)
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails
    with pytest.raises(MissingExtraError, match="pip install 'chatretriever\\[openvino\\]'"):
        set_runtime(retriever, "openvino")
    assert retriever.encode_settings == FastEncodeSettings(token_budget=512)  # refused first


# ------------------------------------------------------------------ with openvino
def test_openvino_fp32_embeddings_equal_the_torch_fast_path(ov, retriever):
    torch_p, torch_s = _encode(retriever, None)
    ov_p, ov_s = _encode(retriever, OV)
    assert ov_p.shape == torch_p.shape == (len(PASSAGES), retriever.dim)
    assert _cosines(ov_p, torch_p).min() >= 0.9999
    assert _cosines(ov_s, torch_s).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ov_p, axis=1), 1.0, atol=1e-5)  # normalised
    info = retriever.runtime_info()
    assert info["runtime"] == "openvino" and info["fast_encode"]["runtime"] == "openvino"
    assert info["dtype"] == "float32" and info["compiled"] is False
    assert info["runtime_detail"]["runtime_precision"] == "f32"
    assert info["runtime_detail"]["runtime"].startswith("openvino ")
    retriever.encode_settings = None
    assert retriever.runtime_info()["runtime"] == "torch"
    assert "runtime_detail" not in retriever.runtime_info()


def test_the_openvino_body_is_cached_and_rebuilt_after_a_weight_change(ov, retriever, monkeypatch):
    import chatretriever.modeling.ov_runtime as ov_runtime

    built = []
    real = ov_runtime.openvino_runner
    monkeypatch.setattr(
        ov_runtime, "openvino_runner", lambda *a, **k: built.append(a[2]) or real(*a, **k)
    )
    retriever.encode_settings = OV
    first = retriever.encode_passages(PASSAGES, batch_size=2)
    body = retriever.encode_body()
    retriever.encode_sessions(SESSIONS)
    assert retriever.encode_body() is body and built == ["f32"]  # converted once
    # Incremental encoding's KV-cache body stays the torch copy.
    assert hasattr(retriever.inference_body(), "decoder")
    _perturb(retriever, seed=1)  # new LoRA weights: a new body
    second = retriever.encode_passages(PASSAGES, batch_size=2)
    assert retriever.encode_body() is not body and built == ["f32", "f32"]
    assert _cosines(first, second).min() < 0.999  # the new weights are in it
    retriever.encode_settings = None
    assert _cosines(second, retriever.encode_passages(PASSAGES)).min() >= 0.9999


def test_a_bf16_compute_dtype_compiles_with_the_bf16_hint(ov, retriever):
    fp32 = retriever.encode_passages(PASSAGES, batch_size=2)
    retriever.config.dtype = "bf16"
    retriever.encode_settings = OV
    bf16 = retriever.encode_passages(PASSAGES, batch_size=2)
    info = retriever.runtime_info()
    assert info["dtype"] == "bfloat16" and info["fp32_layers"] == 0
    assert info["runtime_detail"]["runtime_precision"] in ("bf16", "f32")  # f32: no native bf16
    assert _cosines(bf16, fp32).min() > 0.99  # a random tiny model


def test_cli_encode_with_openvino_records_it(ov, tiny_llama_dir, tmp_path, capsys):
    from chatretriever.cli import main

    corpus = tmp_path / "corpus.jsonl"
    rows = [{"_id": p.id, "title": p.title or "", "text": p.text} for p in PASSAGES]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "emb"
    argv = ["encode", str(corpus), "--model", str(tiny_llama_dir), "--out", str(out)]
    assert main([*argv, "--runtime", "openvino", "--batch-size", "2"]) == 0
    metas = sorted(out.glob("chunk-*/meta.json"))
    assert metas and "4 passages encoded" in capsys.readouterr().out
    runtime = json.loads(metas[0].read_text())["extra"]["runtime"]
    assert runtime["runtime"] == "openvino" and runtime["fast_encode"]["runtime"] == "openvino"
    assert runtime["runtime_detail"]["runtime"].startswith("openvino ")


def test_openvino_runtime_is_set_on_an_llm_keeping_its_other_settings(ov, retriever):
    from chatretriever.cli.pipeline import set_runtime

    retriever.encode_settings = FastEncodeSettings(token_budget=512)
    set_runtime(retriever, "openvino")
    assert retriever.encode_settings == FastEncodeSettings(token_budget=512, runtime="openvino")
