"""llama.cpp CPU peer check and decode speed on a random 1bitLLM-large-shaped model (issues 3/4).

    pip install llama-cpp-python          # builds llama.cpp from source (~7 min on 2 cores)
    python benchmarks/bench_llamacpp.py --dir /tmp/bn-large [--tokens 64] [--threads 2]

1. Writes a random packed model of the 1bitLLM large shape (hidden 1536, intermediate 4096, 24 layers, 16 heads,
   vocab 32002, SiLU, tied head; f32 per-tensor scales like a real conversion), unless DIR/model.bin exists.
2. Exports it with our exporter to TQ2_0 and TQ1_0 GGUF (`bitnet-convert packed-to-gguf`). The scales are not
   exact in f16, so the files carry them in `blk.N.*.scale` tensors: this exercises that path in llama.cpp.
3. Peer check: llama.cpp (llama_cpp.Llama, logits for every position) and our runtime run the same token ids;
   prints top-1 agreement, mean KL(ours‖llama.cpp) and max |Δlogit|. They differ by design in the activation
   quantization (ours: int8 absmax per token, BitNet's; llama.cpp: Q8_K per 256-block), so logits are close,
   not equal.
4. Decode speed: llama.cpp greedy decode of N tokens after a short prompt, n_threads as given; our runtime's
   CPU decode of a few tokens on the same file for reference.

Prints one JSON object per measurement and a Markdown table row for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

HIDDEN, INTER, LAYERS, HEADS, VOCAB, CTX = 1536, 4096, 24, 16, 32002, 2048
LINEARS = {
    "attn.q_proj": (HIDDEN, HIDDEN), "attn.k_proj": (HIDDEN, HIDDEN), "attn.v_proj": (HIDDEN, HIDDEN),
    "attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


def _tokenizer() -> dict:
    """A small byte-level BPE (the model's other ids are padding rows); token ids are fed directly anyway."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog and a random model"] * 50, trainer)
    return {"tokenizer_json": tok.to_str(), "chat_template": None, "bos_token": "<s>", "eos_token": "</s>",
            "add_bos_token": False, "add_eos_token": False}


def make_random_1bitllm_large(path: Path, seed: int = 0, layers: int = LAYERS, embed_dtype: str = "bf16") -> None:
    """Random ternary codes (about 1/3 zeros), f32 scales in [0.02, 0.1), bf16 norms and embedding (or f32)."""
    from bitnet158.formats.packed import PackedWriter, TensorSpec
    from bitnet158.formats.ternary import pack_t2

    g = torch.Generator().manual_seed(seed)
    cfg = {"family": "1bitllm", "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": layers,
           "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "head_dim": HIDDEN // HEADS,
           "vocab_size": VOCAB, "max_position_embeddings": CTX, "rope_theta": 10000.0, "rope_style": "neox",
           "rope_scaling": None, "rms_norm_eps": 1e-5, "hidden_act": "silu", "sub_norms": True,
           "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": [2]}
    specs = [TensorSpec("embed.weight", embed_dtype, (VOCAB, HIDDEN))]
    for i in range(layers):
        norms = (("attn_norm", HIDDEN), ("attn.sub_norm", HIDDEN), ("mlp_norm", HIDDEN), ("mlp.sub_norm", INTER))
        for norm, n in norms:
            specs.append(TensorSpec(f"layers.{i}.{norm}.weight", "bf16", (n,)))
        for lin, shape in LINEARS.items():
            name = f"layers.{i}.{lin}.weight"
            specs.append(TensorSpec(name, "t2", shape, scale=name + "_scale", scale_granularity="tensor"))
            specs.append(TensorSpec(name + "_scale", "f32", (1,)))
    specs.append(TensorSpec("norm.weight", "bf16", (HIDDEN,)))
    prov = {"source": "random 1bitLLM-large shape (benchmarks/bench_llamacpp.py)", "revision": None, "files": {},
            "converter": "bench", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with PackedWriter(path, config=cfg, tokenizer=_tokenizer(), provenance=prov, tensors=specs, overwrite=True) as w:
        for s in specs:
            if s.dtype == "t2":
                w.write(s.name, pack_t2(torch.randint(-1, 2, s.shape, generator=g, dtype=torch.int8)))
            elif s.name.endswith("_scale"):
                w.write(s.name, (0.02 + 0.08 * torch.rand(1, generator=g)).to(torch.float32))
            elif s.name == "embed.weight":
                w.write(s.name, (torch.randn(s.shape, generator=g) * 0.5).to(torch.bfloat16).to(
                    torch.float32 if embed_dtype == "f32" else torch.bfloat16))
            else:
                w.write(s.name, (1 + 0.1 * torch.randn(s.shape, generator=g)).to(torch.bfloat16))


def _q8k_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """ggml's Q8_K activation quantization (quantize_row_q8_K_ref), dequantized: per 256-block,
    iscale = -127 / (the value of largest magnitude), q = min(127, round(iscale · x)), x ≈ q / iscale."""
    xb = x.float().reshape(x.shape[0], -1, 256)
    idx = xb.abs().argmax(-1, keepdim=True)
    mx = xb.gather(-1, idx)
    iscale = torch.where(mx == 0, torch.zeros_like(mx), -127.0 / mx)
    q = (xb * iscale).round().clamp(max=127)
    return torch.where(mx == 0, torch.zeros_like(xb), q / iscale).reshape(x.shape)


def ours_logits_q8k(model, ids: list[int]) -> np.ndarray:
    """Our graph with llama.cpp's activation quantization in every BitLinear (a diagnostic: if this matches
    llama.cpp, the exported file and both graphs agree, and the rest is the activation-quantization choice)."""
    from bitnet158.runtime.bitlinear import BitLinear

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        y = _q8k_fake_quant(x2) @ self.unpacked().float().t() * self.scale
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    original = BitLinear.forward
    BitLinear.forward = forward
    try:
        return model.logits(ids).double().numpy()
    finally:
        BitLinear.forward = original


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict:
    la = torch.from_numpy(ours).double().log_softmax(-1)
    lb = torch.from_numpy(theirs).double().log_softmax(-1)
    kl = (la.exp() * (la - lb)).sum(-1)
    return {"top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "max_abs_logit_diff": float(np.abs(ours - theirs).max()), "logit_range": float(np.abs(ours).max())}


def llama_logits(llama_cpp, gguf_path: Path, ids: list[int], threads: int, f32_kv: bool = False) -> np.ndarray:
    """llama.cpp's logits for every position; f32_kv: an F32 KV cache instead of the default F16."""
    kv = {"type_k": 0, "type_v": 0} if f32_kv else {}  # 0 = GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_threads=threads, n_ctx=256, logits_all=True, verbose=False,
                          **kv)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float64)
    del llm
    return theirs


def llama_decode_speed(llama_cpp, gguf_path: Path, prompt: list[int], n: int, threads: int, repeats: int) -> dict:
    """Greedy decode of n tokens after `prompt`, `repeats` times from a fresh KV cache; best and median tok/s
    (the best run is the least disturbed by other processes on a shared machine)."""
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads, n_ctx=512,
                          verbose=False)
    rates, prompt_rates = [], []
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        prompt_rates.append(len(prompt) / (time.perf_counter() - t0))
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])  # warm-up step, not timed
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
        rates.append(n / (time.perf_counter() - t0))
    del llm
    return {"decode_tok_s": max(rates), "decode_tok_s_median": float(np.median(rates)),
            "prompt_tok_s": max(prompt_rates), "tokens": n, "repeats": repeats}


def ours_reference(packed: Path, ids: list[int], decode_tokens: int) -> dict:
    """Our runtime on CPU: logits (BitNet int8 activations and the Q8_K diagnostic), prefill and decode speed."""
    from bitnet158.runtime import load
    from bitnet158.runtime.generate import GenerationStats

    model = load(str(packed), device="cpu", cache_unpacked=True)
    t0 = time.perf_counter()
    logits = model.logits(ids).double().numpy()
    out = {"logits": logits, "prefill_tok_s": len(ids) / (time.perf_counter() - t0),
           "logits_q8k": ours_logits_q8k(model, ids), "decode_tok_s": None}
    if decode_tokens:
        stats = GenerationStats()
        for _ in model.generate_ids(ids[:8], max_new_tokens=decode_tokens + 1, stop_ids=(), stats=stats):
            pass
        out["decode_tok_s"] = stats.decode_tok_s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="Working folder (model.bin and the GGUFs go here).")
    ap.add_argument("--tokens", type=int, default=64, help="Greedy tokens llama.cpp decodes for the timing.")
    ap.add_argument("--ours-tokens", type=int, default=4, help="Tokens our runtime decodes for reference (0: skip).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="tq2_0,tq1_0")
    ap.add_argument("--repeats", type=int, default=3, help="Timed decode runs per type (best and median reported).")
    ap.add_argument("--speed-only", action="store_true", help="Skip our runtime and the logit comparison.")
    ap.add_argument("--layers", type=int, default=LAYERS, help="Fewer layers: a less chaotic random model.")
    ap.add_argument("--f32-embed", action="store_true",
                    help="f32 embedding, so llama.cpp's head runs in f32 (isolates the activation quantization).")
    args = ap.parse_args()

    import llama_cpp

    from bitnet158.converter.gguf_convert import packed_to_gguf

    args.dir.mkdir(parents=True, exist_ok=True)
    packed = args.dir / f"model-{args.layers}l{'-f32' if args.f32_embed else ''}.bin"
    if not packed.exists():
        t0 = time.perf_counter()
        make_random_1bitllm_large(packed, layers=args.layers, embed_dtype="f32" if args.f32_embed else "bf16")
        print(json.dumps({"made": str(packed), "seconds": round(time.perf_counter() - t0, 1)}), flush=True)

    rng = np.random.default_rng(0)
    ids = [1] + rng.integers(3, VOCAB, size=31).tolist()  # BOS + 31 random tokens
    torch.set_num_threads(args.threads)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    ours = {}
    if not args.speed_only:
        ours = ours_reference(packed, ids, args.ours_tokens)

    for q in args.types.split(","):
        g = packed.with_name(f"{packed.stem}-{q}.gguf")
        t0 = time.perf_counter()
        s = packed_to_gguf(packed, g, qtype=q, force=True)
        rec = {"type": q, "arch": s["arch"], "gguf_bytes": g.stat().st_size,
               "export_s": round(time.perf_counter() - t0, 1)}
        row = ""
        if ours:
            peer = agreement(ours["logits"], llama_logits(llama_cpp, g, ids, args.threads))
            theirs_f32kv = llama_logits(llama_cpp, g, ids, args.threads, f32_kv=True)
            peer_q8k = {f"q8k_{k}": v for k, v in agreement(ours["logits_q8k"], theirs_f32kv).items()}
            rec.update(peer, **peer_q8k, self_q8k_vs_int8=agreement(ours["logits"], ours["logits_q8k"]),
                       ours_cpu_prefill_tok_s=ours["prefill_tok_s"], ours_cpu_decode_tok_s=ours["decode_tok_s"])
            row = (f" {peer['top1_agreement'] * 100:.0f}% of {len(ids)} | {peer['mean_kl']:.2e} |"
                   f" {peer_q8k['q8k_top1_agreement'] * 100:.0f}% / {peer_q8k['q8k_mean_kl']:.2e} |")
        speed = llama_decode_speed(llama_cpp, g, ids[:8], args.tokens, args.threads, args.repeats)
        rec.update(speed, load_avg=os.getloadavg(), threads=args.threads, llama_cpp_python=llama_cpp.__version__,
                   machine=machine)
        print(json.dumps(rec), flush=True)
        print(f"| {q.upper()} | {rec['gguf_bytes'] / 1e6:.0f} MB | {speed['decode_tok_s']:.2f} "
              f"(median {speed['decode_tok_s_median']:.2f}) | {speed['prompt_tok_s']:.1f} |{row}", flush=True)


if __name__ == "__main__":
    main()
