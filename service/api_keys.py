"""API keys: a credential on every inference route, HTTP and gRPC, when `PUPPET_API_KEYS_FILE` names a file.

The file holds one key per line, optionally followed by whitespace and a name; blank lines and lines starting
with `#` are skipped. A key is 16 to 256 printable ASCII characters without spaces. The name (default: `key-`
and the first 8 hex digits of the key's SHA-256) is what the access log records; the key never is.

A key is checked in time that depends on neither its content nor its length: the SHA-256 digest of what the
caller presents is compared with every key's digest (`hmac.compare_digest`, no early exit).

The file is read again when it changes (its size, modification time or inode; checked every `RELOAD_CHECK_S`) and
on SIGHUP, so a key is revoked without a restart. A file that no longer reads or parses leaves the keys in force
and logs why: a typo must neither lock every caller out nor let anyone in.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("puppet.auth")

MIN_KEY_CHARS, MAX_KEY_CHARS = 16, 256
RELOAD_CHECK_S = 0.25


class ApiKeysError(ValueError):
    """The keys file cannot be used: the message names the file and the line, never a key."""


@dataclass(frozen=True)
class _Key:
    digest: bytes
    name: str


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def parse_keys(text: str, source: str) -> tuple[_Key, ...]:
    """The keys of a keys file's text; ApiKeysError naming the line of the first that is not a valid key."""
    keys, seen = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, name = line.partition(" ")
        key, name = key.strip(), name.strip()
        if not (MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS) or not (key.isascii() and key.isprintable()):
            raise ApiKeysError(
                f"{source}, line {number}: a key is {MIN_KEY_CHARS} to {MAX_KEY_CHARS} printable ASCII characters "
                "without spaces (the key itself is not shown)"
            )
        digest = _digest(key)
        if digest in seen:
            raise ApiKeysError(f"{source}, line {number}: the same key as an earlier line")
        seen.add(digest)
        keys.append(_Key(digest, name or f"key-{digest.hex()[:8]}"))
    return tuple(keys)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class ApiKeys:
    """The keys in force, read from `path` (ApiKeysError at start-up when it cannot be used)."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp = _stamp(path)
        self._keys = self._read()
        if not self._keys:
            log.warning("%s holds no key: every protected request will be refused (401)", path)
        self._watch: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._keys)

    def _read(self) -> tuple[_Key, ...]:
        try:
            text = self.path.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError as e:
            raise ApiKeysError(f"cannot read the API keys file {self.path}: {e.strerror}") from None
        return parse_keys(text, str(self.path))

    def authenticate(self, presented: str) -> str | None:
        """The name of the key presented, or None when it is not one of the keys in force."""
        digest, name = _digest(presented), None
        for key in self._keys:  # every key is compared: the time does not say which matched, or whether one did
            if hmac.compare_digest(digest, key.digest) and name is None:
                name = key.name
        return name

    def reload(self) -> bool:
        """Read the file again; False (the keys in force kept, the reason logged) when it cannot be used."""
        self._stamp = _stamp(self.path)
        try:
            keys = self._read()
        except ApiKeysError as e:
            log.error("API keys not reloaded, the %d in force are kept: %s", len(self._keys), e)
            return False
        self._keys = keys
        log.info("API keys reloaded from %s: %d in force", self.path, len(keys))
        return True

    def reload_if_changed(self) -> bool:
        if _stamp(self.path) == self._stamp:
            return False
        return self.reload()

    def start_watching(self) -> None:
        """On the running event loop: reload on SIGHUP and whenever the file changes."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (a test's loop): polling only
            pass
        self._watch = loop.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_CHECK_S)
            self.reload_if_changed()

    def stop_watching(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None


@dataclass(frozen=True)
class Refusal:
    reason: str  # puppet_auth_failures_total's label: missing, malformed or invalid
    message: str

    @property
    def challenge(self) -> str:
        """The WWW-Authenticate header (RFC 6750)."""
        return 'Bearer realm="puppet-cnn"' + (', error="invalid_token"' if self.reason == "invalid" else "")


MISSING = Refusal("missing", "an API key is required: send Authorization: Bearer <key> (or X-API-Key: <key>)")
MALFORMED = Refusal("malformed", "the Authorization header must be Bearer <key>")
INVALID = Refusal("invalid", "the API key is not valid")


def check_credentials(keys: ApiKeys, authorization: str | None, api_key: str | None) -> str | Refusal:
    """The key's name, or why the request is refused. `authorization`: the Authorization header or gRPC metadata;
    `api_key`: the X-API-Key header (used when there is no Authorization)."""
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return MALFORMED
        presented = token.strip()
    elif api_key is not None:
        presented = api_key.strip()
    else:
        return MISSING
    name = keys.authenticate(presented)
    return INVALID if name is None else name
