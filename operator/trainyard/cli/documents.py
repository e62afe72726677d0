"""Reading resource files: multi-document YAML, with the file and document each came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trainyard.api import manifests


@dataclass(frozen=True)
class Document:
    """One YAML document of a file."""

    path: str
    index: int
    body: Any

    @property
    def label(self) -> str:
        name = self.body.get("metadata", {}).get("name") if isinstance(self.body, dict) else None
        kind = self.body.get("kind") if isinstance(self.body, dict) else None
        where = f"{self.path}#{self.index}" if self.index else self.path
        return f"{where} ({kind}/{name})" if kind and name else where


class UnreadableFile(Exception):
    """A file that is missing or is not YAML."""


def not_utf8(path: str, error: UnicodeDecodeError) -> str:
    """One line for a file that is not UTF-8 text (YAML files are).

    >>> not_utf8("a.yaml", UnicodeDecodeError("utf-8", b"ab\\xff", 2, 3, "invalid start byte"))
    'a.yaml: not UTF-8 text (byte 0xff at offset 2: invalid start byte); save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 a.yaml`'
    """
    byte = error.object[error.start : error.start + 1].hex()
    return (
        f"{path}: not UTF-8 text (byte 0x{byte} at offset {error.start}: {error.reason}); "
        f"save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path}`"
    )


def read_documents(path: str) -> list[Document]:
    """The non-empty documents of a YAML file ('-' reads standard input)."""
    try:
        text = Path("/dev/stdin").read_text() if path == "-" else Path(path).read_text()
    except OSError as error:
        raise UnreadableFile(f"{path}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise UnreadableFile(not_utf8(path, error)) from None
    try:
        bodies = manifests.load_all(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise UnreadableFile(
            f"{path}{where}: not valid YAML: {getattr(error, 'problem', error)}"
        ) from None
    return [Document(path, i, body) for i, body in enumerate(bodies) if body is not None]
