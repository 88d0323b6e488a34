"""Runtime benchmark: load time, time to first token, prefill and decode speed, peak memory of one model file.

    python benchmarks/bench_runtime.py MODEL.bin [--device cpu|cuda] [--reference] [--cache-unpacked] [--runs 5]
    python benchmarks/bench_runtime.py --make-random-1bitllm-large DIR  # then bitnet-convert hf-to-packed DIR -o x.bin
    bitnet-convert random 1bitllm-large -o x.bin                         # same shape, written directly

What is measured, through the path ``load`` picks (the fast path on CUDA and, where torch.compile works, on the
CPU; ``--reference`` for the plain network), with the device synchronised around every timed region; token ids
are random, sampling is greedy:
- load: ``bitnet158.runtime.load`` from a cold start of the call (mmap, copies to the device, building modules);
- ttft: a fresh 16-token prompt → first generated token (``generate_ids``: prefill + sampling), median over runs;
- prefill: one forward of 512 tokens from position 0 to the last position's logits, tok/s, median over runs
  (one warm-up first);
- decode: batch 1, ``--decode-tokens`` greedy tokens after a 16-token prompt (``generate_ids``, static KV
  cache), tok/s over the decode loop only, median over runs (one warm-up first, which also compiles);
- peak memory: CUDA max_memory_allocated, or the process's peak RSS on the CPU (includes Python and torch);
- resident weights: bytes of weights kept on the device (packed ternary, + unpacked caches, + floats).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

LARGE = dict(hidden=1536, intermediate=4096, layers=24, heads=16, vocab=32002, context=2048)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(
    path: str,
    device: str | None,
    dtype: str | None,
    cache_unpacked: bool,
    runs: int,
    decode_tokens: int,
    prefill_tokens: int,
    backend: str | None,
    reference: bool = False,
) -> dict:
    from bitnet158.runtime import load
    from bitnet158.runtime.generate import GenerationStats

    t0 = time.perf_counter()
    model = load(
        path, device=device, dtype=dtype, cache_unpacked=cache_unpacked, backend=backend, reference=reference
    )
    dev = model.device
    _sync(dev)
    load_s = time.perf_counter() - t0
    net, cfg = model.net, model.config
    gen = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist()  # noqa: E731
    prefill_tokens = min(prefill_tokens, cfg.max_position_embeddings)
    net.setup_cache(1, max(prefill_tokens, 16 + decode_tokens))

    def last_logits(ids: torch.Tensor) -> torch.Tensor:
        # what generation runs for a prompt: the fast path's forward when the model has one, else the network
        return model.fast.logits_last(ids, 0) if model.fast is not None else net(ids, 0)[:, -1]

    def ttft() -> float:
        # a fresh prompt → first token, through the model's own generation path (prefill + sampling)
        stats = GenerationStats()
        _sync(dev)
        t = time.perf_counter()
        next(iter(model.generate_ids(rand(16), 1, stop_ids=(), stats=stats)))
        return time.perf_counter() - t

    def prefill() -> float:
        ids = torch.tensor([rand(prefill_tokens)], device=dev)
        _sync(dev)
        t = time.perf_counter()
        last_logits(ids)
        _sync(dev)
        return prefill_tokens / (time.perf_counter() - t)

    def decode() -> float:
        stats = GenerationStats()
        for _ in model.generate_ids(rand(16), decode_tokens, stop_ids=(), stats=stats):
            pass
        return stats.decode_tok_s

    ttft(), prefill(), decode()  # warm-up (allocator, kernels, caches)
    out = {
        "file": str(path),
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "dtype": str(model.dtype).replace("torch.", ""),
        "cache_unpacked": cache_unpacked,
        "backend": model.backend,
        "path": model.last_stats.path if model.last_stats else None,
        "load_s": round(load_s, 2),
        "ttft_ms": round(1000 * statistics.median(ttft() for _ in range(runs)), 1),
        f"prefill{prefill_tokens}_tok_s": round(statistics.median(prefill() for _ in range(runs)), 1),
        "decode_tok_s": round(statistics.median(decode() for _ in range(runs)), 2),
        "peak_mib": round(_peak_mib(dev), 1),
        "resident_weight_mib": round(model.resident_weight_bytes() / 2**20, 1),
    }
    return out


# --- a random checkpoint of the 1bitLLM-large shape ---------------------------------------------------------------
def _sentencepiece_model(path: Path, n_pieces: int) -> None:
    """A SentencePiece BPE tokenizer.model built directly as a proto: specials, 256 byte-fallback pieces, then
    lower-case letter n-grams with and without the word-start mark '▁' (no training corpus needed)."""
    import itertools
    import string

    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = n_pieces
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    for piece, kind in (
        ("<unk>", pb.ModelProto.SentencePiece.UNKNOWN),
        ("<s>", pb.ModelProto.SentencePiece.CONTROL),
        ("</s>", pb.ModelProto.SentencePiece.CONTROL),
    ):
        m.pieces.add(piece=piece, score=0.0, type=kind)
    for b in range(256):
        m.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=pb.ModelProto.SentencePiece.BYTE)
    letters = string.ascii_lowercase
    grams = itertools.chain(
        ["▁", *letters, *(f"▁{c}" for c in letters)],
        ("".join(p) for p in itertools.product(letters, repeat=2)),
        ("▁" + "".join(p) for p in itertools.product(letters, repeat=2)),
        ("".join(p) for p in itertools.product(letters, repeat=3)),
        ("▁" + "".join(p) for p in itertools.product(letters, repeat=3)),
    )
    for i, g in enumerate(itertools.islice(grams, n_pieces - len(m.pieces))):
        m.pieces.add(piece=g, score=-float(i), type=pb.ModelProto.SentencePiece.NORMAL)
    path.write_bytes(m.SerializeToString())


def make_random_1bitllm_large(out: Path, seed: int = 0) -> None:
    """Write a random 1bitLLM-style HF checkpoint (BitnetForCausalLM, fp16 latent weights) of the large shape."""
    from safetensors.torch import save_file

    s = LARGE
    out.mkdir(parents=True, exist_ok=True)
    _sentencepiece_model(out / "tokenizer.model", 32000)
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": False,
                "model_max_length": s["context"],
            },
            indent=2,
        )
    )
    cfg = {
        "architectures": ["BitnetForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["heads"],
        "vocab_size": s["vocab"],
        "max_position_embeddings": s["context"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float16",
        "attention_bias": False,
        "input_bits": 8,
        "weight_bits": 1,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, std=0.02: (torch.randn(shape, generator=gen) * std).to(torch.float16)  # noqa: E731
    h, i = s["hidden"], s["intermediate"]
    state = {"model.embed_tokens.weight": rnd(s["vocab"], h, std=0.02), "model.norm.weight": 1 + rnd(h)}
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        for name, shape in (
            ("self_attn.q_proj", (h, h)),
            ("self_attn.k_proj", (h, h)),
            ("self_attn.v_proj", (h, h)),
            ("self_attn.o_proj", (h, h)),
            ("mlp.gate_proj", (i, h)),
            ("mlp.up_proj", (i, h)),
            ("mlp.down_proj", (h, i)),
        ):
            state[p + name + ".weight"] = rnd(*shape)
        state[p + "input_layernorm.weight"] = 1 + rnd(h)
        state[p + "post_attention_layernorm.weight"] = 1 + rnd(h)
        state[p + "self_attn.inner_attn_ln.weight"] = 1 + rnd(h)
        state[p + "mlp.ffn_layernorm.weight"] = 1 + rnd(i)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", nargs="?")
    ap.add_argument("--device", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", choices=["bf16", "f16", "f32"])
    ap.add_argument("--cache-unpacked", action="store_true")
    ap.add_argument("--backend", help="BitLinear backend on the plain network (reference, triton, cpu)")
    ap.add_argument("--reference", action="store_true", help="the reference path (no fast path)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--make-random-1bitllm-large", metavar="DIR", type=Path)
    a = ap.parse_args()
    if a.make_random_1bitllm_large:
        make_random_1bitllm_large(a.make_random_1bitllm_large)
        print(
            f"wrote {a.make_random_1bitllm_large}; convert it with: bitnet-convert hf-to-packed "
            f"{a.make_random_1bitllm_large} -o large.bin"
        )
        return
    if not a.file:
        ap.error("give a model file (or --make-random-1bitllm-large DIR)")
    if a.threads:
        torch.set_num_threads(a.threads)
    r = bench(
        a.file, a.device, a.dtype, a.cache_unpacked, a.runs, a.decode_tokens, a.prefill_tokens, a.backend, a.reference
    )
    json.dump(r, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
