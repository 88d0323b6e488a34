"""HF and GGUF checkpoints → bitnet158 packed files (and packed → GGUF)."""

import importlib.metadata


def converter_version() -> str:
    """The provenance string of this converter, e.g. ``"bitnet158 0.1.0"``.

    Falls back to ``"bitnet158 (source tree)"`` when the package runs from a checkout without installed metadata
    (as on a machine where it was only put on the path), instead of failing the conversion.
    """
    try:
        return f"bitnet158 {importlib.metadata.version('bitnet158')}"
    except importlib.metadata.PackageNotFoundError:
        return "bitnet158 (source tree)"
