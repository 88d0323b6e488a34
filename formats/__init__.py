"""On-disk formats of bitnet158: the packed format (PACKED.md), the ternary codecs, and source detection."""

from bitnet158.formats.packed import PackedFile, PackedFormatError, PackedWriter, TensorInfo, TensorSpec, describe
from bitnet158.formats.source import SourceError, open_source

__all__ = [
    "open_source",
    "SourceError",
    "PackedFile",
    "PackedWriter",
    "TensorSpec",
    "TensorInfo",
    "PackedFormatError",
    "describe",
]
