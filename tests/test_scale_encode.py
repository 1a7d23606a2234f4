"""Encoding at scale: shards picked under torchrun, and a Ray Data actor pool, both writing the
same resumable chunk shards as one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from fakes import HashEncoder

import chatretriever
from chatretriever.apps.registry import register_encoder, unregister_encoder
from chatretriever.cli import main
from chatretriever.io.embeddings import read_embeddings, read_meta
from chatretriever.retrieval.encode import (
    SETTINGS,
    EncodeConfig,
    encode_corpus,
    list_shards,
)
from chatretriever.retrieval.shards import shard_from_env
from chatretriever.types import Passage

TORCHRUN_TIMEOUT = 300


def make_corpus(n: int) -> list[Passage]:
    # Lengths vary, so length-sorted batches differ from corpus order.
    words = "jaguars live in the rain forest and eat fish deer and capybaras".split()
    return [
        Passage(f"d{i:03d}", " ".join(words[: 2 + i % 9]) + f" item {i}", title=f"t{i % 3}")
        for i in range(n)
    ]


def write_corpus(path: Path, passages: list[Passage]) -> Path:
    rows = [{"_id": p.id, "title": p.title, "text": p.text} for p in passages]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_all(out_dir: Path) -> tuple[list[str], np.ndarray]:
    ids, rows = [], []
    for d in list_shards([out_dir]):
        i, e, _ = read_embeddings(d)
        ids += i
        rows.append(np.asarray(e))
    return ids, np.concatenate(rows)  # (N, D)


# ----------------------------------------------------------------- shards from the environment
@pytest.mark.parametrize(
    ("env", "shard"),
    [
        ({}, None),
        ({"RANK": "1", "WORLD_SIZE": "2"}, (1, 2)),
        ({"RANK": "0", "WORLD_SIZE": "1"}, (0, 1)),
    ],
)
def test_shard_from_env(env, shard):
    assert shard_from_env({**env, "LOCAL_RANK": "0"} if env else {}) == shard


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "0"}, "WORLD_SIZE is not set"),
        ({"WORLD_SIZE": "2"}, "RANK is not set"),
        ({"RANK": "a", "WORLD_SIZE": "2"}, "must be integers"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "0 <= RANK < WORLD_SIZE"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "0 <= RANK < WORLD_SIZE"),
    ],
)
def test_shard_from_env_refuses_inconsistent_values(env, message):
    with pytest.raises(ValueError, match=message):
        shard_from_env(env)


@pytest.fixture
def fake_encoder():
    register_encoder("fake", lambda rest: HashEncoder(name=rest or "fake-hash"))
    yield
    unregister_encoder("fake")


def test_cli_takes_its_shard_from_torchrun_env(fake_encoder, tmp_path, monkeypatch, capsys):
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_corpus(25))
    argv = ["encode", str(corpus), "--model", "fake:", "--out", str(tmp_path / "e")]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*argv, "--chunk-size", "10"]) == 0  # chunks 0, 1, 2: process 1 has chunk 1
    assert "10 passages encoded into 1 chunks" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "e").glob("chunk-*")) == ["chunk-00001"]
    assert json.loads((tmp_path / "e" / SETTINGS).read_text())["num_shards"] == 2
    assert main([*argv, "--chunk-size", "10", "--shard", "1/2"]) == 0  # agrees: fine

    assert main([*argv, "--chunk-size", "10", "--shard", "0/1"]) == 2
    assert "--shard 0/1 disagrees with torchrun's RANK=1 WORLD_SIZE=2" in capsys.readouterr().err
    assert main([*argv, "--engine", "ray"]) == 2
    assert "do not start it under torchrun" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "3")
    assert main(argv) == 2
    assert "RANK=3 WORLD_SIZE=2" in capsys.readouterr().err


def test_local_engine_refuses_ray_options(fake_encoder, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_corpus(3))
    argv = ["encode", str(corpus), "--model", "fake:", "--out", str(tmp_path / "e")]
    assert main([*argv, "--actors", "2"]) == 2
    assert "--address and --actors go with --engine ray" in capsys.readouterr().err


# ------------------------------------------------- several processes share one output directory
def test_one_finished_process_does_not_make_the_directory_complete(tmp_path):
    corpus, out = make_corpus(35), tmp_path / "emb"  # chunks 0..3 of 10
    cfg = partial(EncodeConfig, batch_size=4, chunk_size=10, show_progress=False)
    encode_corpus(HashEncoder(), corpus, out, cfg(shard=(0, 2)))  # process 0: chunks 0, 2
    assert json.loads((out / SETTINGS).read_text())["num_chunks"] == 4  # a corpus fact
    with pytest.raises(ValueError, match=r"2 of 4 chunks \(missing chunk-00001, chunk-00003\)"):
        list_shards([out])
    encode_corpus(HashEncoder(), corpus, out, cfg(shard=(1, 2)))  # process 1: chunks 1, 3
    ids, emb = read_all(out)
    assert ids == [p.id for p in corpus]
    np.testing.assert_array_equal(emb, HashEncoder().encode_passages(corpus))


def test_a_stray_chunk_cannot_stand_in_for_a_missing_one(tmp_path):
    out = tmp_path / "emb"
    cfg = EncodeConfig(chunk_size=10, show_progress=False)
    encode_corpus(HashEncoder(), make_corpus(40), out, cfg)  # chunks 0..3
    encode_corpus(HashEncoder(), make_corpus(30), out, cfg)  # a shorter corpus: 0..2
    shutil.rmtree(out / "chunk-00001")  # ...and one of its chunks lost: still 3 chunks on disk
    with pytest.raises(ValueError, match=r"2 of 3 chunks \(missing chunk-00001\)"):
        list_shards([out])
    encode_corpus(HashEncoder(), make_corpus(30), out, cfg)
    with pytest.raises(ValueError, match=r"beyond the corpus's 3 \(chunk-00003\)"):
        list_shards([out])


# ---------------------------------------- a tiny fp32 model: torchrun and Ray equal one process
@pytest.fixture(scope="module")
def model_and_corpus(tiny_llama_dir, tmp_path_factory):
    """A saved tiny ChatRetriever (fp32), a 40-passage corpus and its one-process encoding."""
    from chatretriever import ChatRetriever
    from chatretriever.config import LoraSettings, RetrieverConfig

    root = tmp_path_factory.mktemp("scale")
    config = RetrieverConfig(n_emb_tokens=2, dtype="fp32", max_session_len=128)
    fresh = ChatRetriever.from_pretrained(
        tiny_llama_dir, config=config, lora=LoraSettings(enabled=False), device="cpu"
    )
    model = fresh.save_pretrained(root / "retriever")
    corpus = write_corpus(root / "corpus.jsonl", make_corpus(40))
    argv = ["encode", str(corpus), "--model", str(model), "--out", str(root / "one")]
    assert main([*argv, "--chunk-size", "8", "--batch-size", "4"]) == 0
    return model, corpus, root / "one"


def assert_same_encoding(out: Path, reference: Path) -> None:
    ids, emb = read_all(out)
    ref_ids, ref = read_all(reference)
    assert ids == ref_ids and len(ids) == 40
    assert np.abs(emb - ref).max() <= 1e-5
    ours, theirs = (json.loads((d / SETTINGS).read_text()) for d in (out, reference))
    assert ours["fingerprint"] == theirs["fingerprint"] and ours["num_chunks"] == 5


def test_torchrun_two_processes_match_one_process(model_and_corpus, tmp_path):
    model, corpus, reference = model_and_corpus
    out = tmp_path / "two"
    src = str(Path(chatretriever.__file__).parents[1])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    argv = ["-m", "chatretriever", "encode", str(corpus), "--model", str(model), "--out", str(out)]
    done = subprocess.run(
        [*torchrun, *argv, "--chunk-size", "8", "--batch-size", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TORCHRUN_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # 5 chunks: process 0 writes 0, 2, 4 (24 passages), process 1 writes 1, 3 (16 passages)
    assert "24 passages encoded into 3 chunks" in done.stdout
    assert "16 passages encoded into 2 chunks" in done.stdout
    assert json.loads((out / SETTINGS).read_text())["num_shards"] == 2
    assert_same_encoding(out, reference)


@pytest.mark.slow  # about 35 s on 2 cores: Ray starts, and 3 processes load torch and the model
def test_ray_two_actors_match_one_process(model_and_corpus, tmp_path, capsys):
    ray = pytest.importorskip("ray")
    model, corpus, reference = model_and_corpus
    out = tmp_path / "ray"
    argv = ["encode", str(corpus), "--model", str(model), "--out", str(out), "--engine", "ray"]
    had_ray = ray.is_initialized()  # another test's Ray (pytest -p random-order): kept running
    assert main([*argv, "--actors", "2", "--chunk-size", "8", "--batch-size", "4"]) == 0
    assert "40 passages encoded into 5 chunks, 0 chunks kept" in capsys.readouterr().out
    assert ray.is_initialized() == had_ray  # a Ray it started is shut down
    assert_same_encoding(out, reference)
    meta = read_meta(out / "chunk-00004")
    assert meta.extra["engine"] == "ray" and meta.extra["start"] == 32 and meta.count == 8
    assert meta.extra["seconds"] > 0 and meta.extra["runtime"]["dtype"] == "float32"


# --------------------------------------------------------------- resuming on Ray, counting calls
class LoggingEncoder(HashEncoder):
    """A HashEncoder that appends every id it encodes to a file of its own process."""

    def __init__(self, log_dir: str) -> None:
        super().__init__()
        self.log = Path(log_dir) / f"{os.getpid()}.txt"

    def encode_passages(self, passages, batch_size=16, show_progress=False):
        with self.log.open("a", encoding="utf-8") as f:
            f.write("".join(f"{p.id}\n" for p in passages))
        return super().encode_passages(passages, batch_size, show_progress)


def encoded_ids(log_dir: Path) -> list[str]:
    return sorted(i for f in log_dir.glob("*.txt") for i in f.read_text().split())


@pytest.fixture(scope="module")
def ray_here():
    """A Ray of these tests (so `encode_corpus_ray` finds one and leaves it running)."""
    ray = pytest.importorskip("ray")
    import fakes

    for module in (fakes, sys.modules[__name__]):  # the actors cannot import tests/
        ray.cloudpickle.register_pickle_by_value(module)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    for module in (fakes, sys.modules[__name__]):
        ray.cloudpickle.unregister_pickle_by_value(module)


def test_ray_resume_encodes_only_the_missing_chunks(ray_here, tmp_path):
    from chatretriever.retrieval.ray_encode import encode_corpus_ray

    corpus, out, logs = make_corpus(30), tmp_path / "emb", tmp_path / "logs"
    logs.mkdir()
    config = EncodeConfig(batch_size=3, chunk_size=5, show_progress=False)  # 6 chunks
    run = partial(encode_corpus_ray, partial(LoggingEncoder, str(logs)), corpus, out, config)
    first = run(num_actors=2)
    assert (first.chunks_written, first.chunks_kept, first.passages_encoded) == (6, 0, 30)
    # each passage encoded once (the identity task builds an encoder but encodes nothing)
    assert encoded_ids(logs) == sorted(p.id for p in corpus)
    ids, emb = read_all(out)
    assert ids == [p.id for p in corpus]
    np.testing.assert_array_equal(emb, HashEncoder().encode_passages(corpus))
    assert ray_here.is_initialized()  # the caller's Ray is left running

    shutil.rmtree(out / "chunk-00002")
    shutil.rmtree(out / "chunk-00004")
    kept = {j: os.stat(out / f"chunk-0000{j}" / "embeddings.npy") for j in (0, 1, 3, 5)}
    for f in logs.glob("*.txt"):
        f.unlink()
    second = run(num_actors=2)
    assert (second.chunks_written, second.chunks_kept, second.passages_encoded) == (2, 4, 10)
    assert encoded_ids(logs) == [f"d{i:03d}" for i in [*range(10, 15), *range(20, 25)]]
    for j, before in kept.items():  # the finished chunks were not rewritten
        after = os.stat(out / f"chunk-0000{j}" / "embeddings.npy")
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    np.testing.assert_array_equal(read_all(out)[1], emb)


def test_ray_refuses_another_model_before_encoding(ray_here, tmp_path):
    from chatretriever.retrieval.ray_encode import encode_corpus_ray

    corpus, out, logs = make_corpus(6), tmp_path / "emb", tmp_path / "logs"
    logs.mkdir()
    encode_corpus(HashEncoder(salt="other"), corpus, out, EncodeConfig(show_progress=False))
    with pytest.raises(ValueError, match="not of model='fake-hash'"):
        encode_corpus_ray(partial(LoggingEncoder, str(logs)), corpus, out, num_actors=1)
    assert encoded_ids(logs) == []


class FakeRay:
    """What `_actor_resources` reads of a Ray cluster."""

    def __init__(self, nodes: list[dict[str, float]]) -> None:
        self._nodes = nodes

    def cluster_resources(self) -> dict[str, float]:
        return {k: sum(n.get(k, 0) for n in self._nodes) for k in ("CPU", "GPU")}

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": n} for n in self._nodes] + [
            {"Alive": False, "Resources": {"CPU": 1.0}}  # a dead node counts for nothing
        ]


@pytest.mark.parametrize(
    ("nodes", "actors", "gpus", "expected"),
    [
        ([{"CPU": 16, "GPU": 4}, {"CPU": 16, "GPU": 4}], None, None, (1.0, 8, 1.0)),
        ([{"CPU": 16, "GPU": 4}], None, 2, (2, 2, 1.0)),  # 2 GPUs each: 2 actors
        ([{"CPU": 16, "GPU": 4}], 3, None, (1.0, 3, 1.0)),
        ([{"CPU": 8}, {"CPU": 8}], None, None, (0.0, 2, 8.0)),  # one actor per node, all its CPUs
        ([{"CPU": 8}, {"CPU": 8}], 4, 0, (0.0, 4, 4.0)),  # an equal share of the CPUs
        ([{"CPU": 2}], 2, 0, (0.0, 2, 1.0)),  # this test box
        ([{"CPU": 2}, {"CPU": 64}], 2, 0, (0.0, 2, 2.0)),  # at most the smallest node's CPUs
        ([{"CPU": 2}], 5, 0, (0.0, 5, 1.0)),  # at least 1 CPU each (some wait for a slot)
    ],
)
def test_actor_resources(nodes, actors, gpus, expected):
    from chatretriever.retrieval.ray_encode import _actor_resources

    assert _actor_resources(FakeRay(nodes), actors, gpus) == expected


def test_actor_resources_refuse_bad_counts():
    from chatretriever.retrieval.ray_encode import _actor_resources

    with pytest.raises(ValueError, match="num_actors >= 1"):
        _actor_resources(FakeRay([{"CPU": 2}]), 0, 0)


def test_ray_engine_without_ray_names_the_extra(fake_encoder, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name.split(".")[0] == "ray":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_corpus(3))
    argv = ["encode", str(corpus), "--model", "fake:", "--out", str(tmp_path / "e")]
    assert main([*argv, "--engine", "ray"]) == 2
    err = capsys.readouterr().err
    assert (
        "encoding on Ray needs ray, which is not installed: pip install 'chatretriever[ray]'" in err
    )
    assert not (tmp_path / "e").exists()


def test_importing_the_ray_engine_imports_neither_ray_nor_torch():
    code = (
        "import sys; import chatretriever.retrieval.ray_encode, chatretriever.cli.encode;"
        " print(sorted(m for m in ('ray', 'torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_an_unreachable_ray_address_is_refused_at_once():
    import socket

    from chatretriever.retrieval.ray_encode import check_reachable

    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
            with pytest.raises(ValueError, match=f"--address {address}: no Ray cluster answers"):
                check_reachable(address, timeout=2)
    with socket.socket() as server:  # something answers: left to Ray
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}")
    check_reachable("auto")  # not host:port: left to Ray


def test_an_actor_computing_another_precision_is_refused(tmp_path):
    from chatretriever.retrieval.ray_encode import _check_fingerprints

    settings = {"fingerprint": "fp-bf16"}
    _check_fingerprints(np.asarray(["fp-bf16", "fp-bf16"], dtype=object), settings, tmp_path)
    mixed = np.asarray(["fp-bf16", "fp-fp32"], dtype=object)  # a node without native bf16
    with pytest.raises(ValueError, match="a Ray actor encodes as fingerprint fp-fp32, not fp-bf16"):
        _check_fingerprints(mixed, settings, tmp_path)
