"""Random BitNet b1.58 models of the published shapes, written as packed files (``bitnet-convert random``).

    bitnet-convert random 2b4t -o rand-2b4t.bin                  # microsoft/bitnet-b1.58-2B-4T's shape, 1.18 GB
    bitnet-convert random 1bitllm-large -o large.bin --layers 4  # fewer layers, same widths

Why: speed and memory depend on the shape, not on the weights, and a benchmark should not need a multi-GB download
or a hub account. These files have the real model's tensors, widths, dtypes and layout (t2 codes, one f32 scale a
tensor, bf16 embedding and norms, a tied head), so every command that takes a packed file takes them:
``bitnet-run``, ``packed-to-gguf``, benchmarks/bench_gpu.py and bench_runtime.py. Their text is noise.

- Ternary codes are uniform over {-1, 0, +1}, packed by formats.ternary.pack_t2 (the t2 codec).
- Scales are per tensor in [0.025, 0.075), rounded to bf16 so that an HF copy (bf16 ``weight_scale``) holds the
  same weights; the embedding is N(0, 0.05²) and the norm weights 1 + N(0, 0.1²), in bf16 (``--embed-dtype f32``
  keeps the embedding in f32).
- The tokenizer is byte-level BPE: a token a byte (ids 3..258) and four merges (ids 259..262: GGUF needs merges),
  BOS added; the other ids of the vocabulary are rows nothing maps to.
- Everything comes from one seeded CPU generator in file order: a seed gives the same tensors wherever it runs
  (with the same torch).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import torch
from bitnet158.converter import converter_version
# MAX_LAYERS, MAX_VOCAB: the largest a random model may be, what the runtime loads, checked before the tensor table
# is built (a billion layers took minutes of Python before failing)
from bitnet158.formats.config import MAX_LAYERS, MAX_VOCAB
from bitnet158.formats.packed import PackedWriter, TensorSpec, model_tensors
from bitnet158.formats.ternary import pack_t2

# The published shapes as packed-file configs (PACKED.md §3): microsoft/bitnet-b1.58-2B-4T and
# 1bitLLM/bitnet_b1_58-large.
SHAPES: dict[str, dict] = {
    "2b4t": {
        "family": "bitnet", "hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 30,
        "num_attention_heads": 20, "num_key_value_heads": 5, "head_dim": 128, "vocab_size": 128256,
        "max_position_embeddings": 4096, "rope_theta": 500000.0, "rope_style": "neox", "rope_scaling": None,
        "rms_norm_eps": 1e-5, "hidden_act": "relu2", "sub_norms": True, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": [2],
    },
    "1bitllm-large": {
        "family": "1bitllm", "hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 96, "vocab_size": 32002,
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "rope_style": "neox", "rope_scaling": None,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "sub_norms": True, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": [2],
    },
}  # fmt: skip
EMBED_DTYPES = ("bf16", "f32")


class RandomModelError(ValueError):
    """The options cannot make a model (an unknown shape, a bad layer count, ...)."""


# the byte tokenizer's few merges: GGUF needs at least one (tokenizer.ggml.merges, for llama.cpp and our reader)
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
MIN_VOCAB = 3 + 256 + len(MERGES)  # <unk> <s> </s>, the 256 bytes, one token a merge


def byte_tokenizer() -> dict:
    """A packed file's tokenizer object: byte-level BPE (MERGES only), <unk> <s> </s> = 0 1 2, BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>"))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return {"tokenizer_json": tok.to_str(), "chat_template": None, "bos_token": "<s>", "eos_token": "</s>",
            "add_bos_token": True, "add_eos_token": False}  # fmt: skip


def model_config(shape: str, layers: int | None = None, vocab: int | None = None) -> dict:
    """The packed-file config of ``shape`` (a SHAPES name), with ``layers`` / ``vocab`` in place of its own."""
    if shape not in SHAPES:
        raise RandomModelError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    c = dict(SHAPES[shape])
    if layers is not None:
        if not 1 <= layers <= MAX_LAYERS:
            raise RandomModelError(f"layers must be in [1, {MAX_LAYERS}], got {layers}")
        c["num_hidden_layers"] = layers
    if vocab is not None:
        if not MIN_VOCAB <= vocab <= MAX_VOCAB:
            raise RandomModelError(f"vocab must be in [{MIN_VOCAB}, {MAX_VOCAB}] (at least the byte tokenizer's ids), "
                                   f"got {vocab}")
        c["vocab_size"] = vocab
    return c


def tensor_specs(config: dict, embed_dtype: str = "bf16") -> list[TensorSpec]:
    """Every tensor of a tied-head model of ``config``, in file order (formats.packed.model_tensors): the
    embedding in ``embed_dtype``, the norms in bf16, each linear as t2 followed by its per-tensor f32 scale."""
    specs = []
    for name, (shape, ternary) in model_tensors(config).items():
        if ternary:
            specs += [TensorSpec(name, "t2", shape, scale=name + "_scale", scale_granularity="tensor"), TensorSpec(name + "_scale", "f32", (1,))]
        else:
            specs.append(TensorSpec(name, embed_dtype if name == "embed.weight" else "bf16", shape))
    return specs


def write_random_model(
    out: str | os.PathLike, config: dict, *, seed: int = 0, embed_dtype: str = "bf16", force: bool = False,
    progress: bool = True,
) -> int:  # fmt: skip
    """Write a random model of ``config`` (``model_config``, or any packed-file config with a tied head) to the
    packed file ``out`` (a temporary file renamed at the end: PackedWriter). Returns its size in bytes."""
    from tqdm import tqdm

    if embed_dtype not in EMBED_DTYPES:
        raise RandomModelError(f"embed dtype must be one of {EMBED_DTYPES}, got {embed_dtype!r}")
    if not config.get("tie_word_embeddings", False):
        raise RandomModelError("random models have a tied head (tie_word_embeddings: true)")
    specs = tensor_specs(config, embed_dtype)
    gen = torch.Generator().manual_seed(seed)
    provenance = {
        "source": f"random (bitnet-convert random, seed {seed})", "revision": None, "files": {},
        "converter": converter_version(), "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }  # fmt: skip
    with PackedWriter(out, config=config, tokenizer=byte_tokenizer(), provenance=provenance, tensors=specs, overwrite=force) as w:
        for spec in tqdm(specs, desc="writing", unit="tensor", disable=not progress):
            if spec.dtype == "t2":
                w.write(spec.name, pack_t2(torch.randint(-1, 2, spec.shape, generator=gen, dtype=torch.int8)))
            elif spec.name.endswith("_scale"):
                w.write(spec.name, (0.025 + 0.05 * torch.rand(1, generator=gen)).bfloat16().float())
            elif spec.name == "embed.weight":
                e = (0.05 * torch.randn(spec.shape, generator=gen)).bfloat16()
                w.write(spec.name, e.float() if embed_dtype == "f32" else e)
            else:
                w.write(spec.name, (1 + 0.1 * torch.randn(spec.shape, generator=gen)).bfloat16())
    return Path(out).stat().st_size


def describe_shape(config: dict) -> str:
    """One line: the widths of ``config``."""
    c = config
    return (f"{c['family']}: hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, {c['num_hidden_layers']} "
            f"layers, {c['num_attention_heads']}/{c['num_key_value_heads']} heads of {c['head_dim']}, vocab "
            f"{c['vocab_size']}, {c['hidden_act']}")  # fmt: skip

