"""Opens a weight source by its magic: a bitnet158 packed file or a GGUF file.

Both expose the same read surface (``.config``, ``.tokenizer``, ``.tensors``, ``.torch(name)``,
``.ternary(name)``, ``.close()``; see PACKED.md §2.2-4 for the names and dicts).
"""

from __future__ import annotations

import importlib
import os

from bitnet158.formats.packed import MAGIC, PackedFile

__all__ = ["open_source", "SourceError", "GGUF_MAGIC"]

GGUF_MAGIC = b"GGUF"


class SourceError(ValueError):
    """The path cannot be opened as a weight source (missing, unreadable, or neither packed nor GGUF)."""


def open_source(path: str | os.PathLike):
    """Opens `path` as a :class:`PackedFile` or a ``GGUFSource``, chosen by the file's first bytes."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(len(MAGIC))
    except IsADirectoryError:
        raise SourceError(f"{path} is a directory, not a model file") from None
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from e
    if magic == MAGIC:
        return PackedFile(path)
    if magic[: len(GGUF_MAGIC)] == GGUF_MAGIC:
        try:
            gguf = importlib.import_module("bitnet158.formats.gguf")
        except ModuleNotFoundError as e:
            if e.name != "bitnet158.formats.gguf":
                raise
            raise SourceError(
                f"{path} is a GGUF file, but this build has no GGUF reader (bitnet158.formats.gguf)"
            ) from None
        return gguf.GGUFSource(path)
    raise SourceError(f"{path} is not a bitnet158 packed file or a GGUF file (magic {magic!r})")
