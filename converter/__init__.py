"""HF and GGUF checkpoints → bitnet158 packed files (and packed → GGUF)."""

import importlib.metadata
import os


def converter_version() -> str:
    """The provenance string of this converter, e.g. ``"bitnet158 0.1.0"``.

    Falls back to ``"bitnet158 (source tree)"`` when the package runs from a checkout without installed metadata
    (as on a machine where it was only put on the path), instead of failing the conversion.
    """
    try:
        return f"bitnet158 {importlib.metadata.version('bitnet158')}"
    except importlib.metadata.PackageNotFoundError:
        return "bitnet158 (source tree)"


def refuse_source_as_output(out: str | os.PathLike, sources, error: type[Exception]) -> None:
    """Raise ``error`` when ``out`` is one of ``sources`` (the files a conversion reads), symlinks followed: with
    --force the rename at the end would replace that source with the output."""
    target = os.path.realpath(out)
    for src in sources:
        if os.path.realpath(src) == target:
            which = "itself" if os.fspath(src) == os.fspath(out) else os.fspath(src)
            raise error(f"{out} is the source file {which}: write the output to another path")
