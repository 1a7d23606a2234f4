"""The Milvus backend on milvus-lite: exact search, fingerprints, resume, the CLI end to end."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from fakes import HashEncoder

from chatretriever.errors import DataFormatError
from chatretriever.io.embeddings import EmbeddingMeta, write_embeddings
from chatretriever.retrieval.index import EncoderMismatchError, load_index
from chatretriever.retrieval.ties import TIE_MARGIN

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

import chatretriever.retrieval.milvus_build as mb  # noqa: E402
import chatretriever.retrieval.milvus_index as mi  # noqa: E402
from chatretriever.retrieval.milvus_index import MilvusIndex  # noqa: E402
from chatretriever.retrieval.milvus_spec import (  # noqa: E402
    build_state,
    check_finished,
    check_ids,
    check_resumable,
    parse_index_spec,
    parse_params,
    spec_text,
)
from chatretriever.retrieval.milvus_uri import is_local, resolve_uri, stored_uri  # noqa: E402


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """One milvus-lite database per module (a server starts per file); one collection a test."""
    return str(tmp_path_factory.mktemp("milvus") / "shared.db")


def random_shards(path, n=300, dim=16, parts=3, fingerprint="fp-a", seed=0, ids=None):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = ids or [f"d{i:03d}" for i in range(n)]
    dirs = []
    for j, rows in enumerate(np.array_split(np.arange(n), parts)):
        meta = EmbeddingMeta(model="m", dim=dim, fingerprint=fingerprint)
        dirs.append(write_embeddings(path / f"s{j}", [ids[i] for i in rows], emb[rows], meta))
    return dirs, ids, emb


def exact(emb, ids, queries, k):
    """numpy's top-k by (-score, id): ids and scores."""
    scores = queries @ emb.T  # (Q, N)
    out = []
    for row in scores:
        order = sorted(range(len(ids)), key=lambda i: (-row[i], ids[i]))[:k]
        out.append([(ids[i], float(row[i])) for i in order])
    return out


def assert_same_hits(got, want):
    assert [[d for d, _ in h] for h in got] == [[d for d, _ in h] for h in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], atol=1e-5)


def test_flat_search_equals_exact_top_k(tmp_path, db, capsys):
    dirs, ids, emb = random_shards(tmp_path)
    index = MilvusIndex.build(dirs, db, "flat", batch_size=64, show_progress=True)
    assert "300/300" in capsys.readouterr().err  # the bar reached every vector
    assert len(index) == 300 and index.ids == ids and index.factory == "milvus:FLAT"
    assert index.upserted == 300 and index.meta.fingerprint == "fp-a"
    queries = emb[[5, 100, 250]] + 0.1
    assert_same_hits(index.search(queries, k=7), exact(emb, ids, queries, 7))
    assert len(index.search(queries[:1], k=1000)[0]) == 300  # k larger than the index
    assert index.memory_bytes == 300 * 16 * 4 + sum(len(i) + 49 for i in ids)


def test_ties_are_broken_by_id(tmp_path, db):
    vec = np.eye(4, dtype=np.float32)[[0, 0, 0, 1]]  # z, a, m share one vector
    meta = EmbeddingMeta(model="m", dim=4, fingerprint="fp-a")
    shard = write_embeddings(tmp_path / "s", ["z", "a", "m", "other"], vec, meta)
    index = MilvusIndex.build([shard], db, "ties")
    (hits,) = index.search(np.eye(4, dtype=np.float32)[:1], k=4)
    assert [d for d, _ in hits] == ["a", "m", "z", "other"]
    assert [s for _, s in hits] == pytest.approx([1.0, 1.0, 1.0, 0.0])


def test_ties_at_the_cut_agree_with_faiss_for_every_k(tmp_path, db):
    from chatretriever.retrieval.index import DenseIndex

    rng = np.random.default_rng(3)
    base = rng.standard_normal((15, 8)).astype(np.float32)
    ids = [f"{p}{i:02d}" for i in range(15) for p in ("x", "d", "a")]  # each vector 3 times
    meta = EmbeddingMeta(model="m", dim=8, fingerprint="fp-a")
    shard = write_embeddings(tmp_path / "s", ids, np.repeat(base, 3, axis=0), meta)
    milvus, faiss = MilvusIndex.build([shard], db, "tied"), DenseIndex.build([shard])
    queries = base[:5] + 0.1
    for k in (1, 4, 10, 20):
        got = [[d for d, _ in h] for h in milvus.search(queries, k=k)]
        assert got == [[d for d, _ in h] for h in faiss.search(queries, k=k)], k
        assert all(h[0].startswith("a") for h in got)  # the tied three: by id, "a" first


def test_hnsw_finds_each_vector_itself(tmp_path, db):
    dirs, ids, emb = random_shards(tmp_path)
    index = MilvusIndex.build(dirs, db, "hnsw", index_spec="hnsw:M=16,efConstruction=64")
    assert index.factory == "milvus:HNSW:M=16,efConstruction=64"
    hits = index.search(emb[:20], k=1, params="efSearch=64")  # Faiss's name, Milvus's "ef"
    assert [h[0][0] for h in hits] == ids[:20]
    links = 300 * 2 * 16 * 4  # level-0 links of HNSW M=16
    assert index.memory_bytes == 300 * 16 * 4 + links + sum(len(i) + 49 for i in ids)


def test_save_load_and_move(tmp_path):
    dirs, ids, emb = random_shards(tmp_path)
    out = tmp_path / "idx"
    index = MilvusIndex.build(dirs, str(out / "milvus.db"), "moved")
    index.save(out, settings={"note": "x"})
    info = json.loads((out / "meta.json").read_text())
    assert info["backend"] == "milvus" and info["uri"] == "milvus.db"  # relative: moves along
    assert info["collection"] == "moved" and info["ntotal"] == 300
    assert info["embedding"]["fingerprint"] == "fp-a" and info["settings"] == {"note": "x"}
    want = index.search(emb[:4], 5)
    index.close()
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(str(out / "milvus.db"))  # as at process exit
    shutil.move(out, tmp_path / "elsewhere")
    loaded = load_index(tmp_path / "elsewhere")
    assert isinstance(loaded, MilvusIndex) and loaded.uri == str(tmp_path / "elsewhere/milvus.db")
    assert loaded.ids == ids and loaded.meta == index.meta and loaded.search(emb[:4], 5) == want


def test_a_faiss_loader_refuses_a_milvus_descriptor(tmp_path, db):
    from chatretriever.retrieval.index import DenseIndex

    dirs, _, _ = random_shards(tmp_path)
    MilvusIndex.build(dirs, db, "desc").save(tmp_path / "idx")
    assert json.loads((tmp_path / "idx/meta.json").read_text())["uri"] == db  # elsewhere: as is
    with pytest.raises(DataFormatError, match="load_index"):
        DenseIndex.load(tmp_path / "idx")


def test_refuses_queries_of_another_encoder(tmp_path, db):
    dirs, _, _ = random_shards(tmp_path)
    index = MilvusIndex.build(dirs, db, "queries")
    index.check_encoder("m", 16, True, "fp-a")
    index.check_encoder("renamed", 16, True, "fp-a")  # same content, another name
    with pytest.raises(EncoderMismatchError, match="same name, other weights"):
        index.check_encoder("m", 16, True, "fp-b")
    with pytest.raises(EncoderMismatchError, match="dim 32"):
        index.check_encoder("m", 32, True, "fp-a")


def test_a_collection_rebuilt_by_another_encoder_is_refused(tmp_path, db):
    a, _, _ = random_shards(tmp_path / "a", fingerprint="fp-a")
    b, _, _ = random_shards(tmp_path / "b", fingerprint="fp-b", seed=1)
    MilvusIndex.build(a, db, "shared").save(tmp_path / "idx")
    with pytest.raises(EncoderMismatchError, match="fp-a.*fp-b.*--overwrite"):
        MilvusIndex.build(b, db, "shared")  # not mixed in
    rebuilt = MilvusIndex.build(b, db, "shared", overwrite=True)
    assert rebuilt.upserted == 300 and rebuilt.meta.fingerprint == "fp-b"
    with pytest.raises(EncoderMismatchError, match="rebuilt since") as e:
        MilvusIndex.load(tmp_path / "idx")  # its descriptor says fp-a
    assert "fp-a" in str(e.value) and "fp-b" in str(e.value)


def test_a_collection_of_another_corpus_is_refused(tmp_path, db):
    a, _, _ = random_shards(tmp_path / "a")
    b, _, _ = random_shards(tmp_path / "b", ids=[f"x{i}" for i in range(300)])
    MilvusIndex.build(a, db, "corpus")
    with pytest.raises(ValueError, match="other passage ids"):
        MilvusIndex.build(b, db, "corpus")


def edited_shards(path, ids, emb):
    """The shards of `random_shards` after passage d005's text changed: another vector, the same
    id. Returns (shard dirs, (N, D) vectors)."""
    edited = emb.copy()
    edited[5] = -edited[5]
    meta = EmbeddingMeta(model="m", dim=16, fingerprint="fp-a")
    dirs = [write_embeddings(path / f"s{j}", [ids[i] for i in rows], edited[rows], meta)
            for j, rows in enumerate(np.array_split(np.arange(len(ids)), 3))]  # fmt: skip
    return dirs, edited


def crash_upserts(monkeypatch, fail_after):
    """Patch a build's writes: upsert call number `fail_after` (0-based) raises ConnectionError,
    as a killed build; set `when["fail_after"] = None` to go on. Returns (rows of each upsert
    that went in, the ids looked up in the collection, when)."""
    calls, looked_up, when = [], [], {"fail_after": fail_after}
    upsert, existing = mb._upsert, mb._existing

    def failing_upsert(client, collection, rows):
        if len(calls) == when["fail_after"]:
            raise ConnectionError("killed")
        calls.append(len(rows))
        return upsert(client, collection, rows)

    def recorded_lookup(client, collection, batch):
        looked_up.extend(batch)
        return existing(client, collection, batch)

    monkeypatch.setattr(mb, "_upsert", failing_upsert)
    monkeypatch.setattr(mb, "_existing", recorded_lookup)
    return calls, looked_up, when


def forget_vectors_digest(client, collection):
    """Make a collection look as a build from before the vectors digest left it."""
    state, _ = mb.recorded_state(client, collection)
    del state["vectors_sha256"]
    properties = {mb.STATE_KEY: json.dumps(state, sort_keys=True)}
    client.alter_collection_properties(collection, properties=properties)


def test_edited_passages_under_the_same_ids_are_not_kept_stale(tmp_path, db):
    """Re-encoded passages whose texts changed keep their ids, not their vectors: a build into
    the collection is refused (it upserted only missing ids, keeping the old vectors), and the
    descriptor of the first build refuses the collection once it is rebuilt."""
    a, ids, emb = random_shards(tmp_path / "a")
    MilvusIndex.build(a, db, "edited").save(tmp_path / "idx")
    b, edited = edited_shards(tmp_path / "b", ids, emb)
    with pytest.raises(ValueError, match="other vectors under these passage ids.*--overwrite"):
        MilvusIndex.build(b, db, "edited")
    assert MilvusIndex.build(a, db, "edited").upserted == 0  # the same vectors: resumable
    rebuilt = MilvusIndex.build(b, db, "edited", overwrite=True)
    assert rebuilt.search(edited[5:6], 1)[0][0][0] == "d005"
    with pytest.raises(DataFormatError, match="rebuilt with other vectors"):
        MilvusIndex.load(tmp_path / "idx")
    rebuilt.save(tmp_path / "idx2")
    assert MilvusIndex.load(tmp_path / "idx2").ids == ids


def test_a_collection_from_before_the_vector_digest_is_refreshed(tmp_path, db, caplog):
    """A collection that records no vectors digest cannot be compared with the shards: a build
    into it upserts every row again (it upserted none, keeping an edited passage's old vector)
    and records the digest, which later builds are compared with."""
    a, ids, emb = random_shards(tmp_path / "a")
    old = MilvusIndex.build(a, db, "undigested")
    forget_vectors_digest(old.client, "undigested")
    b, edited = edited_shards(tmp_path / "b", ids, emb)
    with caplog.at_level("WARNING"):
        refreshed = MilvusIndex.build(b, db, "undigested")
    assert "'undigested' was built before chatretriever recorded a digest" in caplog.text
    assert "every row is upserted again" in caplog.text
    assert refreshed.upserted == 300
    assert refreshed.search(edited[5:6], 1)[0][0] == ("d005", pytest.approx(1.0, abs=1e-5))
    recorded, done = mb.recorded_state(refreshed.client, "undigested")
    assert recorded["vectors_sha256"] == refreshed.vectors_sha256 and done == 300
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert MilvusIndex.build(b, db, "undigested").upserted == 0  # now a plain resume
    assert "digest" not in caplog.text
    with pytest.raises(ValueError, match="other vectors under these passage ids"):
        MilvusIndex.build(a, db, "undigested")  # the digest is compared from now on


def test_an_interrupted_refresh_is_refreshed_again(tmp_path, db, monkeypatch):
    """The digest is recorded only once every row is in: a refresh that dies half way leaves
    none, and its re-run upserts every row again (it cannot tell the rows it reached)."""
    a, ids, emb = random_shards(tmp_path / "a")
    old = MilvusIndex.build(a, db, "halfway")
    forget_vectors_digest(old.client, "halfway")
    b, edited = edited_shards(tmp_path / "b", ids, emb)
    # shard 0 (d000..d099) refreshed and recorded in two batches, then a crash
    _, looked_up, when = crash_upserts(monkeypatch, fail_after=2)
    with pytest.raises(ConnectionError):
        MilvusIndex.build(b, db, "halfway", batch_size=64)
    recorded, done = mb.recorded_state(old.client, "halfway")
    assert "vectors_sha256" not in recorded and done == 100
    when["fail_after"] = None  # the re-run does not fail
    index = MilvusIndex.build(b, db, "halfway", batch_size=64)
    assert index.upserted == 300 and looked_up == []  # all again, none trusted
    assert index.search(edited[5:6], 1)[0][0][0] == "d005"
    assert mb.recorded_state(index.client, "halfway")[0]["vectors_sha256"] == index.vectors_sha256


def test_loading_an_index_from_before_the_vector_digest_warns(tmp_path, db, caplog):
    """Its collection or its descriptor records no vectors digest: the load cannot tell a
    collection rebuilt since with edited passages, and says so (naming what to do)."""
    a, ids, _ = random_shards(tmp_path / "a")
    index = MilvusIndex.build(a, db, "oldload")
    index.save(tmp_path / "idx")
    with caplog.at_level("WARNING"):
        MilvusIndex.load(tmp_path / "idx")
    assert "digest" not in caplog.text  # both recorded: compared, nothing to say
    state, _ = mb.recorded_state(index.client, "oldload")
    forget_vectors_digest(index.client, "oldload")
    with caplog.at_level("WARNING"):
        assert MilvusIndex.load(tmp_path / "idx").ids == ids  # still loads
    assert "the Milvus collection 'oldload' was built before" in caplog.text
    assert "is not checked; build the index again" in caplog.text
    index.client.alter_collection_properties(
        "oldload", properties={mb.STATE_KEY: json.dumps(state, sort_keys=True)}
    )
    info = json.loads((tmp_path / "idx/meta.json").read_text())
    info["vectors_sha256"] = None  # a descriptor written before the digest existed
    (tmp_path / "idx/meta.json").write_text(json.dumps(info))
    caplog.clear()
    with caplog.at_level("WARNING"):
        MilvusIndex.load(tmp_path / "idx")
    assert f"the index {tmp_path / 'idx'} was built before" in caplog.text


def test_ivf_on_milvus_lite_is_warned_about(tmp_path, db, caplog):
    """milvus-lite picks its own number of IVF lists (nlist is not honoured): said at build."""
    a, _, emb = random_shards(tmp_path / "a")
    with caplog.at_level("WARNING"):
        index = MilvusIndex.build(a, db, "ivf", index_spec="IVF_FLAT:nlist=4")
    assert "nlist is not honoured" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        MilvusIndex.build(a, db, "flat")
    assert "nlist" not in caplog.text
    assert len(index.search(emb[:2], 5, params="nprobe=128")[0]) == 5


def test_a_long_id_is_refused_by_name(tmp_path, db):
    long_id = "p" * 600
    shard = write_embeddings(
        tmp_path / "s", ["ok", long_id], np.eye(2, dtype=np.float32), EmbeddingMeta("m", 2)
    )
    with pytest.raises(ValueError, match="'pppp.*600 bytes.*512"):
        MilvusIndex.build([shard], db, "long")


@pytest.mark.parametrize(("fail_after", "resumed"), [(1, 236), (2, 200)])
def test_an_interrupted_load_resumes(tmp_path, db, monkeypatch, fail_after, resumed):
    """Three shards of 100 rows, batches of 64: a crash after one batch (64 rows in) or after two
    (shard 0 finished and recorded); the re-run upserts only the rest."""
    dirs, ids, emb = random_shards(tmp_path)
    calls, looked_up, when = crash_upserts(monkeypatch, fail_after)
    name = f"resume{fail_after}"
    with pytest.raises(ConnectionError):
        MilvusIndex.build(dirs, db, name, batch_size=64)
    assert looked_up == []  # a new collection: nothing to look up
    assert sum(calls) == 300 - resumed
    when["fail_after"] = None  # the re-run does not fail
    calls.clear()
    index = MilvusIndex.build(dirs, db, name, batch_size=64)
    assert index.upserted == sum(calls) == resumed  # nothing written twice
    assert looked_up[0] == ("d000" if resumed == 236 else "d100")  # finished shards: skipped
    queries = emb[[0, 150, 299]]
    assert_same_hits(index.search(queries, 5), exact(emb, ids, queries, 5))
    again = MilvusIndex.build(dirs, db, name, batch_size=64)  # finished: nothing to do
    assert again.upserted == 0 and len(again) == 300


def test_ids_with_quotes_are_looked_up_when_resuming(tmp_path, db, monkeypatch):
    ids = ["O'Brien", 'say "hi"', "back\\slash", "ünï", "a,b", "plain"]
    vec = np.eye(6, dtype=np.float32)
    shard = write_embeddings(tmp_path / "s", ids, vec, EmbeddingMeta("m", 6, fingerprint="f"))
    upsert = mb._upsert

    def fail_second(client, collection, rows):
        if rows[0][mi.ID_FIELD] == "ünï":
            raise ConnectionError("killed")
        return upsert(client, collection, rows)

    monkeypatch.setattr(mb, "_upsert", fail_second)
    with pytest.raises(ConnectionError):
        MilvusIndex.build([shard], db, "quotes", batch_size=3)
    monkeypatch.setattr(mb, "_upsert", upsert)
    index = MilvusIndex.build([shard], db, "quotes", batch_size=3)
    assert index.upserted == 3  # the first three were found under their own ids
    assert [h[0][0] for h in index.search(vec, k=1)] == ids


def test_parsers_and_defaults(tmp_path):
    assert parse_index_spec("Flat") == ("FLAT", {})
    assert parse_index_spec("ivf_flat:nlist=8") == ("IVF_FLAT", {"nlist": 8})
    with pytest.raises(ValueError, match="index type"):
        parse_index_spec("IVF4,PQ4x4")  # a Faiss factory
    assert parse_params("efSearch=64, radius=0.5,x=y") == {"ef": 64, "radius": 0.5, "x": "y"}
    assert parse_params(None) == {}
    with pytest.raises(ValueError, match="key=value"):
        parse_params("ef")
    from chatretriever.retrieval.corpus_index import default_collection

    assert default_collection(tmp_path / "my-index.v2") == "my_index_v2"
    assert default_collection(tmp_path / "2024") == "cr_2024"
    server = "http://host:19530"
    assert stored_uri(server, tmp_path) == server and resolve_uri(server, tmp_path) == server
    assert stored_uri(str(tmp_path / "db/x.db"), tmp_path / "idx") == "../db/x.db"
    assert resolve_uri("../db/x.db", tmp_path / "idx") == str(tmp_path / "db/x.db")
    assert mi.parse_index_spec is parse_index_spec and mi.stored_uri is stored_uri  # still there


def test_index_spec_round_trip_by_hand():
    hnsw = ("HNSW", {"M": 16, "efConstruction": 200})
    assert parse_index_spec("HNSW:M=16,efConstruction=200") == hnsw
    assert spec_text(*hnsw) == "HNSW:M=16,efConstruction=200" and spec_text("FLAT", {}) == "FLAT"
    assert parse_index_spec(" hnsw : M=8 ") == ("HNSW", {"M": 8})
    assert parse_params("nprobe=16,radius=1e-3,level=,metric=IP") == {
        "nprobe": 16,
        "radius": 0.001,
        "level": "",
        "metric": "IP",
    }
    assert is_local("x.db") and is_local("/a/b.db") and not is_local("http://host:19530")
    assert not is_local("https://host/x.db") and not is_local("milvus.sqlite")


def test_build_state_and_its_checks(tmp_path):
    meta = EmbeddingMeta(model="m", dim=2, fingerprint="f", count=2, extra={"chunk": 1})
    state = build_state(meta, ["a", "b"], "FLAT", {})
    assert state == {
        "embedding": {
            "model": "m",
            "dim": 2,
            "dtype": "float32",
            "normalized": True,
            "fingerprint": "f",
        },
        "ids_sha256": hashlib.sha256(b"a\nb\n").hexdigest(),
        "vectors_sha256": hashlib.sha256(b"").hexdigest(),  # no vectors given
        "index": {"type": "FLAT", "params": {}},
    }
    vec = np.eye(2, dtype=np.float32)
    with_vectors = build_state(meta, ["a", "b"], "FLAT", {}, [vec[:1], vec[1:]])
    assert with_vectors["vectors_sha256"] == hashlib.sha256(vec.tobytes()).hexdigest()
    check_resumable(state, state, meta, "c")  # the same build resumes
    check_finished(state, 2, meta, ["a", "b"], "c", tmp_path)
    with pytest.raises(ValueError, match="'c' was not made by chatretriever"):
        check_resumable(None, state, meta, "c")
    with pytest.raises(ValueError, match="other index type"):
        check_resumable(state, build_state(meta, ["a", "b"], "HNSW", {"M": 8}), meta, "c")
    other = EmbeddingMeta(model="m", dim=2, fingerprint="g")
    with pytest.raises(EncoderMismatchError, match="rebuilt since"):
        check_finished(state, 2, other, ["a", "b"], "c", tmp_path)
    with pytest.raises(DataFormatError, match="unfinished build") as e:
        check_finished(state, 1, meta, ["a", "b"], "c", tmp_path)  # one row of two recorded
    assert "ids.txt" in str(e.value)
    with pytest.raises(DataFormatError, match="records no chatretriever build"):
        check_finished(None, 0, meta, [], "c", tmp_path)
    check_ids(["\u00e9" * 256])  # 512 bytes in UTF-8: the longest id a primary key holds
    with pytest.raises(ValueError, match="514 bytes"):
        check_ids(["ok", "\u00e9" * 257])


# --- the CLI end to end (fake encoder) ---------------------------------------------------------

CORPUS = [
    {"_id": "diet", "title": "Jaguar", "text": "jaguars eat deer capybaras and caimans"},
    {"_id": "range", "title": "Jaguar", "text": "jaguars live in the rainforest of the americas"},
    {"_id": "car", "title": "Jaguar Cars", "text": "the jaguar car company builds luxury cars"},
    {"_id": "pasta", "title": "Pasta", "text": "how to cook pasta with tomato sauce"},
]
SESSIONS = [
    {"id": "q1", "messages": [{"role": "user", "content": "what do jaguars eat"}]},
    {"id": "q2", "messages": [{"role": "user", "content": "how do I cook pasta"}]},
]


@pytest.fixture
def cli_files(tmp_path):
    from chatretriever.apps.registry import register_encoder, unregister_encoder

    pytest.importorskip("faiss")
    for name, rows in (("corpus.jsonl", CORPUS), ("sessions.jsonl", SESSIONS)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    register_encoder("fake", lambda rest: HashEncoder(name=rest or "fake-hash"))
    yield tmp_path
    unregister_encoder("fake")


def _search(d, index_dir, out):
    from chatretriever.cli import main
    from chatretriever.io.trec import read_run

    sessions = str(d / "sessions.jsonl")
    argv = ["search", "--index", str(index_dir), "--sessions", sessions, "--k", "4"]
    assert main([*argv, "--model", "fake:", "--out", str(d / out)]) == 0
    return read_run(d / out)


def _same_run(a, b):
    assert a.scores.keys() == b.scores.keys()
    for q in a.scores:
        assert [h.doc_id for h in a.ranked(q)] == [h.doc_id for h in b.ranked(q)]
        assert [h.score for h in a.ranked(q)] == pytest.approx([h.score for h in b.ranked(q)])


def test_cli_index_of_emb_dirs_then_search_matches_faiss(cli_files, capsys):
    from chatretriever.cli import main

    d = cli_files
    argv = ["encode", str(d / "corpus.jsonl"), "--model", "fake:", "--out", str(d / "emb")]
    assert main([*argv, "--chunk-size", "2"]) == 0
    assert main(["index", str(d / "emb"), "--out", str(d / "faiss")]) == 0
    assert main(["index", str(d / "emb"), "--backend", "milvus", "--out", str(d / "mv")]) == 0
    assert "indexed 4 passages (milvus:FLAT, fake-hash)" in capsys.readouterr().out
    info = json.loads((d / "mv/meta.json").read_text())
    assert info["uri"] == "milvus.db" and info["collection"] == "mv"  # the defaults
    assert (d / "mv/milvus.db").is_dir() and info["settings"]["backend"] == "milvus"
    milvus_run, faiss_run = _search(d, d / "mv", "mv.trec"), _search(d, d / "faiss", "f.trec")
    _same_run(milvus_run, faiss_run)
    assert milvus_run.ranked("q2")[0].doc_id == "pasta"
    code = main(["index", str(d / "emb"), "--out", str(d / "x"), "--uri", str(d / "x.db")])
    assert code == 2 and "go with --backend milvus" in capsys.readouterr().err


def test_cli_index_of_a_corpus_on_milvus(cli_files, capsys, caplog):
    from chatretriever.cli import main
    from chatretriever.retrieval.corpus_index import CorpusIndex

    d = cli_files
    base = ["index", str(d / "corpus.jsonl"), "--model", "fake:"]
    assert main([*base, "--out", str(d / "faiss")]) == 0
    argv = [*base, "--out", str(d / "mv"), "--backend", "milvus", "--collection", "jaguars"]
    assert main([*argv, "--factory", "HNSW:M=8", "--upsert-batch-size", "3"]) == 0
    assert "(milvus:HNSW:M=8, fake-hash)" in capsys.readouterr().out
    info = json.loads((d / "mv/index/meta.json").read_text())
    assert info["uri"] == "../milvus.db" and info["collection"] == "jaguars"
    assert info["settings"]["model"] == "fake:" and info["settings"]["upsert_batch_size"] == 3
    loaded = CorpusIndex.load(d / "mv")  # what chat, answer and serve load
    assert isinstance(loaded.index, MilvusIndex) and loaded.model == "fake:"
    assert loaded.passages["pasta"].title == "Pasta"
    from chatretriever.apps.server.engine import SearchEngine, SearchItem
    from chatretriever.types import as_session

    engine = SearchEngine(HashEncoder(), loaded)  # the server's worker
    question = as_session([{"role": "user", "content": "how do I cook pasta"}])
    (hits,) = engine.search_batch([SearchItem(question, k=2)])
    assert [h.doc_id for h in hits][:1] == ["pasta"] and hits[0].title == "Pasta"
    caplog.clear()
    assert main([*argv, "--factory", "HNSW:M=8"]) == 0  # a re-run keeps chunks and rows
    assert "jaguars: 0 rows upserted, 4 kept" in caplog.text
    _same_run(_search(d, d / "mv", "mv.trec"), _search(d, d / "faiss", "f.trec"))


# --- one-line errors: index specs, Milvus failures, a busy database, search parameters ----------


@pytest.fixture
def milvus_error_logs(caplog):
    """ERROR records of pymilvus (which does not propagate to the root logger) and milvus-lite."""
    import logging

    pymilvus_logger = logging.getLogger("pymilvus")
    pymilvus_logger.addHandler(caplog.handler)
    yield lambda: [r for r in caplog.records if r.levelno >= logging.ERROR]
    pymilvus_logger.removeHandler(caplog.handler)


def _release(index, db_path):
    """Close an index and stop this process's milvus-lite server of its file (as at exit)."""
    from milvus_lite.server_manager import server_manager_instance

    index.close()
    server_manager_instance.release_server(str(db_path))


def test_an_index_spec_is_checked_when_parsed(tmp_path, db):
    for spec, match in (
        ("HNSW32", r"--factory 'HNSW32'.*Faiss factory.*HNSW:M=32"),
        ("IVF4096,Flat", r"IVF_FLAT:nlist=4096"),
        ("IVF_PQ:nlist=4", r"'IVF_PQ' is not supported; supported: FLAT, HNSW"),
        ("HNSW:M=abc", r"--factory 'HNSW:M=abc': M must be an integer"),
        ("HNSW:m=16", r"HNSW takes no parameter 'm' \(it takes M, efCons"),
        ("FLAT:nlist=4", r"FLAT takes no parameter 'nlist' \(it takes none\)"),
        ("HNSW:M=1", r"M must be an integer in \[2, 2048\], got '1'"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_index_spec(spec)
    assert parse_index_spec("AUTOINDEX") == ("AUTOINDEX", {})
    dirs, _, _ = random_shards(tmp_path, n=8, dim=4, parts=1)
    with pytest.raises(ValueError, match="HNSW:M=32"):
        MilvusIndex.build(dirs, db, "faiss_spelling", index_spec="HNSW32")
    client = mi.connect(db)
    assert "faiss_spelling" not in client.list_collections()  # refused before anything
    client.close()


def test_a_collection_milvus_cannot_load_is_one_line(
    tmp_path, monkeypatch, caplog, milvus_error_logs
):
    """An index built before specs were checked ("HNSW32" was stored as given) fails to load in
    milvus-lite: one line naming the index directory, no logged traceback."""
    dirs, _, _ = random_shards(tmp_path, n=8, dim=4, parts=1)
    monkeypatch.setattr(mi, "parse_index_spec", lambda spec: ("HNSW32", {}))  # the old parser
    index = MilvusIndex.build(dirs, str(tmp_path / "idx/milvus.db"), "old")
    index.save(tmp_path / "idx")
    _release(index, tmp_path / "idx/milvus.db")
    monkeypatch.undo()
    caplog.clear()  # milvus-lite's background index build of the bad type, during the build
    with pytest.raises(DataFormatError, match=r"idx: Milvus could not load .*'old'.*HNSW32"):
        load_index(tmp_path / "idx")
    assert [r.name for r in milvus_error_logs() if r.name.startswith("pymilvus")] == []
    assert "milvus_lite.adapter.grpc.servicer" not in [r.name for r in milvus_error_logs()]


def test_a_database_open_in_another_process_is_one_line(tmp_path, milvus_error_logs):
    import subprocess
    import sys

    dirs, _, _ = random_shards(tmp_path, n=8, dim=4, parts=1)
    path = tmp_path / "idx/milvus.db"
    index = MilvusIndex.build(dirs, str(path), "busy")
    index.save(tmp_path / "idx")
    _release(index, path)
    hold = "import sys; from pymilvus import MilvusClient; MilvusClient(uri=sys.argv[1]); "
    hold += "print('ready', flush=True); sys.stdin.read()"  # holds the file until stdin closes
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(ValueError, match="is open in another process") as e:
            load_index(tmp_path / "idx")
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            holder.kill()
    assert str(path) in str(e.value) and "one process per file" in str(e.value)
    assert "--uri http://" in str(e.value) and "\n" not in str(e.value)
    assert milvus_error_logs() == []  # milvus-lite's "Failed to start" traceback is not logged


def test_search_params_follow_the_index_type(tmp_path, db):
    from pymilvus import MilvusException

    from chatretriever.retrieval.milvus_spec import check_search_params

    dirs, ids, emb = random_shards(tmp_path, n=40, dim=8, parts=1)
    flat = MilvusIndex.build(dirs, db, "params_flat")
    with pytest.raises(ValueError, match=r"--params\) 'foo=7'.*FLAT index takes no param.*'foo'"):
        flat.set_search_params("foo=7")
    with pytest.raises(ValueError, match=r"takes no parameter 'ef' \(it takes none\)"):
        flat.search(emb[:1], k=3, params="ef=128")
    hnsw = MilvusIndex.build(dirs, db, "params_hnsw", index_spec="HNSW:M=8")
    with pytest.raises(ValueError, match=r"'nprobe' \(it takes ef\)"):
        hnsw.set_search_params("nprobe=4")
    with pytest.raises(ValueError, match=r"ef must be an integer >= 1, got 'abc'"):
        hnsw.set_search_params("ef=abc")
    assert check_search_params("nprobe=2", "IVF_FLAT") == {"nprobe": 2}
    sent = []
    search = hnsw.client.search

    def spy(*args, **kwargs):
        sent.append(kwargs["search_params"]["params"])
        return search(*args, **kwargs)

    hnsw.client.search = spy
    # below k: raised to the depth searched (k and the margin past it that ties are looked for)
    low = hnsw.search(emb[:3], k=10, params="ef=1")
    assert sent[-1] == {"ef": 10 + TIE_MARGIN} and [len(h) for h in low] == [10, 10, 10]
    assert hnsw.search(emb[:3], k=10, params="efSearch=10") == low
    hnsw.search(emb[:1], k=5, params="ef=32")
    hnsw.search(emb[:1], k=40)  # the kept ef=32 is below k=40
    assert sent[-2:] == [{"ef": 32}, {"ef": min(40 + TIE_MARGIN, len(hnsw.ids))}]

    def failing(*args, **kwargs):
        raise MilvusException(code=1, message="collection not loaded")

    hnsw.save(tmp_path / "desc")
    hnsw.client.search = failing
    with pytest.raises(DataFormatError, match=r"desc: Milvus could not search .*not loaded"):
        hnsw.search(emb[:1], k=3)


def test_cli_refuses_a_faiss_factory_and_unknown_params_on_milvus(cli_files, capsys):
    from chatretriever.cli import main

    d = cli_files
    base = ["index", str(d / "corpus.jsonl"), "--model", "fake:", "--backend", "milvus"]
    assert main([*base, "--out", str(d / "bad"), "--factory", "HNSW32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --factory 'HNSW32'") and "HNSW:M=32" in err[-1]
    assert main([*base, "--out", str(d / "mv")]) == 0
    argv = ["search", "--index", str(d / "mv"), "--sessions", str(d / "sessions.jsonl")]
    capsys.readouterr()
    assert main([*argv, "--model", "fake:", "--out", str(d / "r"), "--params", "foo=7"]) == 2
    assert capsys.readouterr().err.startswith("error: search parameters (--params) 'foo=7'")
    assert not (d / "r").exists()


@pytest.mark.parametrize("factory", ["HNSW:M=16", "IVF_FLAT:nlist=8", "FLAT", "AUTOINDEX"])
def test_cli_refuses_a_milvus_spec_on_faiss_and_a_zero_upsert_batch(cli_files, capsys, factory):
    from chatretriever.cli import main

    d = cli_files
    base = ["index", str(d / "corpus.jsonl"), "--model", "fake:", "--out", str(d / "x")]
    assert main([*base, "--factory", factory]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --factory {factory!r} is a Milvus index spec: add --backend milvus, "
                   "or give a Faiss factory string (Flat, HNSW32, IVF1024,Flat, ...)")  # fmt: skip
    assert main([*base, "--backend", "milvus", "--upsert-batch-size", "0"]) == 2
    assert "--upsert-batch-size must be positive" in capsys.readouterr().err
    assert not (d / "x").exists()
