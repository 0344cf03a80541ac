"""Credentials read from files (a mounted Secret), re-read when they change, and scrubbed from every message."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .errors import Unavailable

__all__ = ["FileSecret", "FixedSecret", "Scrubber"]


class FileSecret:
    """The stripped contents of one file. Secrets rotate (a Secret's files are swapped through a symlink), so the
    file is looked at on each use but read only when it changed; a stat and a small read do not hold up the loop
    noticeably. A missing or empty file is :class:`Unavailable`: it may be mounted later."""

    def __init__(self, path: Path, *, what: str) -> None:
        self.path = path
        self._what = what
        self._key: tuple[int, int, int] | None = None
        self._value = ""

    def value(self) -> str:
        try:
            st = os.stat(self.path)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if key != self._key:
                value = self.path.read_text().strip()
                if not value:
                    raise Unavailable(f"the {self._what} file {self.path} is empty")
                self._value, self._key = value, key
        except OSError as exc:
            raise Unavailable(f"cannot read the {self._what} file {self.path}: {exc.strerror or exc}") from exc
        return self._value

    def known(self) -> str:
        """The last value read, without reading (for scrubbing; '' before the first read)."""
        return self._value


class FixedSecret:
    """A secret given as a value (from the environment) rather than a file; speaks as :class:`FileSecret` does."""

    def __init__(self, value: str) -> None:
        self._value = value

    def value(self) -> str:
        return self._value

    def known(self) -> str:
        return self._value


class Scrubber:
    """Replaces every secret a provider has sent with ``***``. A server or a proxy may echo what it was sent."""

    def __init__(self) -> None:
        self._fixed: list[str] = []
        self._files: list[FileSecret] = []
        self._derived: list[Callable[[], str]] = []

    def add(self, secret: str | FileSecret | FixedSecret | Callable[[], str]) -> None:
        """A fixed secret, a file's, or one made from them (``derived``, e.g. a basic-auth header's base64)."""
        if isinstance(secret, FixedSecret):
            self.add(secret.value())
        elif isinstance(secret, FileSecret):
            self._files.append(secret)
        elif isinstance(secret, str):
            if secret:
                self._fixed.append(secret)
        else:
            self._derived.append(secret)

    def secrets(self) -> list[str]:
        found = [*self._fixed, *(f.known() for f in self._files), *(d() for d in self._derived)]
        # Longest first: a secret containing another must be replaced whole.
        return sorted({s for s in found if s}, key=len, reverse=True)

    def text(self, text: str) -> str:
        for secret in self.secrets():
            text = text.replace(secret, "***")
        return text

    def body(self, body: bytes) -> bytes:
        # Before an excerpt is cut from it: a secret cut in two no longer matches, and half a secret is still a leak.
        for secret in self.secrets():
            body = body.replace(secret.encode(), b"***")
        return body
