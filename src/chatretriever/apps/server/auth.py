"""API keys: where they come from, when the server may run without them, and the Bearer check.

Keys come from the environment variable `CHATRETRIEVER_API_KEYS` (comma-separated) and/or a file
(one key per line; blank lines, `#` comment lines and ` # ...` after a key are skipped). A
server without keys refuses to start unless `--no-auth` is given, and `--no-auth` is accepted
only on a loopback host. Presented keys are compared in constant time (`hmac.compare_digest` on
SHA-256 digests, against every key, with no early exit), and a refusal never says which part was
wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from chatretriever.errors import DataFormatError
from chatretriever.io.files import iter_lines

logger = logging.getLogger(__name__)

ENV_VAR = "CHATRETRIEVER_API_KEYS"
MIN_KEY_CHARS = 16


def _check_key(key: str, where: str) -> None:
    if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key) or not key.isprintable():
        raise ValueError(
            f"{where}: an API key needs at least {MIN_KEY_CHARS} printable characters and no "
            "spaces (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )


def load_api_keys(
    keys_file: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> list[str]:
    """The API keys from `CHATRETRIEVER_API_KEYS` and `keys_file`.

    Args:
        keys_file: A file with one key per line (`#` comments, ` # ...` after a key and blank
            lines skipped), or None.
        environ: The environment to read (default `os.environ`).

    Returns:
        The distinct keys, in order. Raises DataFormatError (file and line) or ValueError (the
        variable and position) for a key that is too short or holds spaces.
    """
    environ = os.environ if environ is None else environ
    keys: list[str] = []
    for i, raw in enumerate(environ.get(ENV_VAR, "").split(",")):
        if raw.strip():
            _check_key(raw.strip(), f"{ENV_VAR} item {i + 1}")
            keys.append(raw.strip())
    if keys_file is not None:
        for line_no, line in iter_lines(keys_file):
            key = line.strip()
            if not key or key.startswith("#"):
                continue
            first, _, rest = key.partition(" ")
            if rest.strip().startswith("#"):  # "KEY  # who holds it"
                key = first
            try:
                _check_key(key, "key")
            except ValueError as e:
                raise DataFormatError(
                    keys_file, str(e).removeprefix("key: "), line=line_no
                ) from None
            keys.append(key)
    return list(dict.fromkeys(keys))


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_auth_settings(keys: list[str], no_auth: bool, host: str) -> None:
    """Refuse settings that would expose the server: raises ValueError saying what to change.

    Args:
        keys: The loaded API keys.
        no_auth: Serve without keys (only on a loopback host).
        host: The address the server binds to.
    """
    if no_auth:
        if not is_loopback(host):
            raise ValueError(
                f"--no-auth is only allowed on a loopback host (127.0.0.1, ::1, localhost), not "
                f"{host!r}: give API keys ({ENV_VAR} or --api-keys-file) to serve on a network"
            )
        if keys:
            logger.warning("--no-auth: the %d API key(s) given are ignored", len(keys))
        return
    if not keys:
        raise ValueError(
            f"no API keys: set {ENV_VAR}=KEY1,KEY2 or pass --api-keys-file FILE "
            "(or --no-auth for a server on 127.0.0.1 only)"
        )


class ApiKeyChecker:
    """Checks `Authorization: Bearer <key>` headers against a set of keys in constant time.

    Args:
        keys: The accepted keys; empty means no check (a `--no-auth` server).
    """

    def __init__(self, keys: list[str]) -> None:
        self._digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def client_id(self, authorization: str | None) -> str | None:
        """A short id of the presented key (to keep clients' conversations apart), "anonymous"
        when auth is off, None when the header is missing or the key is wrong.

        Args:
            authorization: The raw `Authorization` header value, or None.
        """
        if not self._digests:
            return "anonymous"
        scheme, _, token = (authorization or "").partition(" ")
        presented = hashlib.sha256(token.strip().encode("utf-8")).digest()
        match = False
        for digest in self._digests:  # no early exit: the time does not depend on which matched
            match |= hmac.compare_digest(presented, digest)
        if not match or scheme.lower() != "bearer":
            return None
        return presented.hex()[:12]
