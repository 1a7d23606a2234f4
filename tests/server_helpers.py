"""What the server tests share: a small corpus indexed with the fake encoder, the app over it,
and a real uvicorn on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fakes import HashEncoder
from fixtures import jsonl, write

from chatretriever.retrieval.corpus_index import CorpusIndex, build_corpus_index

KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}

CORPUS = [
    {"_id": "diet", "title": "Jaguar diet", "text": "jaguars eat deer capybaras and caimans"},
    {"_id": "range", "title": "Jaguar range", "text": "jaguars live in the rainforests"},
    {"_id": "pasta", "title": "Pasta", "text": "cook pasta in salted water with tomato sauce"},
    {"_id": "shoes", "title": "Shoes", "text": "running shoes for marathon training"},
    {"_id": "owls", "title": "Owls", "text": "owls hunt mice at night"},
    {"_id": "sauce", "title": "Tomato sauce", "text": "simmer tomatoes garlic and basil"},
]


def build_fake_index(root: Path, encoder: HashEncoder | None = None) -> tuple[Path, HashEncoder]:
    """A corpus index of CORPUS built with the fake encoder under the model name "fake:"."""
    encoder = encoder or HashEncoder()
    corpus = write(root / "corpus.jsonl", jsonl(CORPUS))
    out = root / "idx"
    build_corpus_index(encoder, "fake:", corpus, out)
    return out, encoder


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root -> (size, mtime_ns): equal before and after means nothing wrote."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def make_app(index_dir: Path, encoder, **settings):
    from chatretriever.apps.server.app import ServerSettings, create_app

    settings.setdefault("model", "fake:")
    return create_app(CorpusIndex.load(index_dir), encoder, ServerSettings(**settings))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(app, timeout: float = 20.0) -> Iterator[str]:
    """Serve `app` with a real uvicorn on 127.0.0.1 in a thread; yields its base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
