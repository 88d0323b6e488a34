#!/usr/bin/env python3
"""The bytes one graph decode step's Triton kernels read, by tensor, and the kernels it launches, counted in
Triton's interpreter: no GPU.

    python benchmarks/traffic.py                       # the demo model (examples/tiny-bitnet), every decode variant
    python benchmarks/traffic.py --file model.bin --prompt-len 40 --json traffic.json
    python benchmarks/traffic.py --shape-2b4t 1        # one layer of the 2B-4T widths (random weights, small vocab)

Why: batch-1 decode is memory-bound, so a step can approach the roofline (bytes per token ÷ bandwidth, RESULTS.md)
only if it reads each weight byte once and the KV cache only where it is filled. A kernel that reads a tile twice
(a prefetch thrown away and loaded again, overlapping splits, the whole static cache where the filled positions
would do) still gives the right logits, so no correctness test sees it, and on the GPU it only shows as a slower
step. Here every ``tl.load`` of the step is recorded (the interpreter's builder, patched for the step: its
addresses under the mask and its element size) and mapped onto the model's tensors:
- t2 weights: the packed linears (q/k/v and gate/up fused);
- scales, norm weights, the int8 head;
- the KV cache: which positions were read, and how often each byte (GQA: once per query head of a group);
- other: activations, packed inputs, attention partials, counters. These stay in L2 on a GPU.
torch's own ops (the bf16 head's matmul, torch's embedding and argmax) are not Triton loads and are not counted.

Launches: the step is the one a CUDA graph captures (``GraphDecoder._step``, greedy: forward, argmax and the state
updates; ``--sampled``: the top-k / top-p draw instead of the argmax), run eagerly. Each Triton launch counts, and
each torch op outside them that is neither a view nor an allocation (a TorchDispatchMode), as one kernel a GPU
would run; cuBLAS may split a matmul in two, which this does not see. On the H200 the profiler counted 314
launches in the default's step of then (RESULTS.md), where this counted 312.

The test (tests/test_kernels.py) runs every variant on a tiny model and requires each t2 weight byte and each
int8 head byte read exactly once, the cache read at the filled positions only, and the default's and the folded
attention's launch counts. Nothing here is a timing.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined: the loads are counted in the interpreter

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class Variant(NamedTuple):
    name: str
    opts: dict  # FastModel keyword arguments


VARIANTS = [
    Variant("packed (CUDA default)", {}),
    Variant("packed, int8 head", {"head": "int8"}),
    Variant("packed, torch's pick", {"argmax": "torch"}),  # torch's argmax, or its sampling ops with --sampled
    Variant("plain", {"gemv": "plain"}),
    Variant("packed, folded attention", {"attention": "folded"}),
    Variant("folded", {"gemv": "folded"}),
]


@contextlib.contextmanager
def counted_loads():
    """Record every Triton load in the interpreter while inside: yields a list that fills with (byte address of
    each loaded element uint64 [n], element size) per load. Uses the interpreter's builder (create_masked_load,
    which create_load calls too; Triton 3.6 and 3.9)."""
    from triton.runtime import interpreter as ti

    builder = type(ti.interpreter_builder)
    plain = builder.create_masked_load
    loads: list[tuple[np.ndarray, int]] = []

    def counted(self, ptrs, mask, other, cache_policy, is_volatile):
        addrs = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]  # the elements the mask lets through
        loads.append((addrs.astype(np.uint64, copy=False), ptrs.get_element_ty().primitive_bitwidth // 8))
        return plain(self, ptrs, mask, other, cache_policy, is_volatile)

    builder.create_masked_load = counted
    try:
        yield loads
    finally:
        builder.create_masked_load = plain


# torch ops that launch nothing on a GPU besides views: allocations and metadata
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "detach", "alias",
              "_local_scalar_dense", "resolve_conj", "resolve_neg"}  # fmt: skip


@contextlib.contextmanager
def counted_launches():
    """Count the kernels a GPU would launch while inside: yields a Counter that fills with launches by name, "triton:
    <kernel>" for each Triton launch (the interpreter's InterpretedFunction.run) and "torch: <op>" for each torch op
    outside them that is not a view or an allocation (the interpreter's own copies of a launch's arguments are not
    counted)."""
    from triton.runtime import interpreter as ti

    counts: collections.Counter = collections.Counter()
    inside = [0]  # > 0 while a Triton launch runs

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not inside[0] and not func.is_view and name not in _NO_KERNEL:
                counts[f"torch: {name}"] += 1
            return func(*args, **(kwargs or {}))

    plain = ti.InterpretedFunction.run

    def run(self, *args, **kwargs):
        counts[f"triton: {self.fn.__name__}"] += 1
        inside[0] += 1
        try:
            return plain(self, *args, **kwargs)
        finally:
            inside[0] -= 1

    ti.InterpretedFunction.run = run
    try:
        with Ops():
            yield counts
    finally:
        ti.InterpretedFunction.run = plain


class Reads(NamedTuple):
    read: int  # bytes loaded, re-reads included
    distinct: int  # bytes loaded at least once
    size: int  # bytes of the tensors
    mask: np.ndarray  # bool [size]: which of their bytes were loaded (in the tensors' order)


def by_size(loads: list[tuple[np.ndarray, int]]) -> dict[int, np.ndarray]:
    """The recorded loads as {element size: sorted byte addresses uint64 [n]} (one entry per element loaded)."""
    sizes = {item for _, item in loads}
    return {item: np.sort(np.concatenate([a for a, i in loads if i == item])) for item in sizes}


def reads_of(loads: dict[int, np.ndarray], tensors: list[torch.Tensor]) -> Reads:
    """What ``loads`` (``by_size``) read of ``tensors`` (contiguous, not overlapping), added up."""
    read = distinct = size = 0
    masks = []
    for t in tensors:
        assert t.is_contiguous(), "a region is a contiguous tensor"
        lo, n = t.data_ptr(), t.numel() * t.element_size()
        hit = np.zeros(n, dtype=bool)
        for item, addrs in loads.items():
            a = addrs[np.searchsorted(addrs, lo) : np.searchsorted(addrs, lo + n)] - np.uint64(lo)
            read += a.size * item
            hit[(a[:, None] + np.arange(item, dtype=np.uint64)).ravel()] = True  # each element's bytes
        distinct += int(hit.sum())
        size += n
        masks.append(hit)
    return Reads(read, distinct, size, np.concatenate(masks) if masks else np.zeros(0, dtype=bool))


def regions(fast) -> dict[str, list[torch.Tensor]]:
    """The model's tensors by kind, as the variant holds them after its first step (q/k/v and gate/up fused)."""
    net = fast.net
    layers = net.layers
    lins = [lin for i in range(len(layers)) for lin in fast.site_linears(i)]
    t2, scales = [lin.packed for lin in lins], [lin.scale for lin in lins]
    norms = [n.weight for layer in layers for n in (layer.attn_norm, layer.attn.sub_norm, layer.mlp_norm, layer.mlp.sub_norm) if n is not None]
    out = {"t2 weights": _unique(t2), "scales": _unique(scales), "norms": _unique([*norms, net.norm.weight]),
           "KV cache": [net.cache_k, net.cache_v]}  # fmt: skip
    if fast.head == "int8":
        out["int8 head"] = [fast.head_q, fast.head_scale]
    return out


def _unique(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    # one entry per storage range (the fused scale vectors of the BitLinears' parts may be the same tensor)
    seen, out = set(), []
    for t in ts:
        key = (t.data_ptr(), t.numel() * t.element_size())
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


@torch.inference_mode()  # the KV cache holds inference tensors
def step_traffic(fast, prompt: list[int], token: int, sampled: bool = False) -> dict:
    """Prefill ``prompt`` (the reference backend, not counted), then count one graph decode step of ``token`` at
    the next position pos: ``GraphDecoder._step`` (greedy, or ``sampled``: temperature 0.8, top-k 50, top-p 0.95,
    as bench_gpu.py's sampled run), the step a CUDA graph captures, run eagerly with the
    position on the device. Returns {kind: Reads, "other": bytes, "total": bytes, "kv_positions": (first, last)
    position read, "kv_filled": whether every byte of positions 0..pos-1 was read, and none past pos, "launches":
    Counter of the kernels launched (counted_launches)}."""
    from bitnet158.runtime.fast import GraphDecoder

    net = fast.net
    pos = len(prompt)
    # the static cache, with room past the step, as a decoder's has: none of it may be read
    dec = GraphDecoder(fast, pos + 16, use_graph=False)
    backend = fast.backend
    fast.set_backend("reference")  # the prompt's keys and values, quickly (the interpreter is slow)
    fast.logits_last(torch.tensor([prompt], device=net.device), 0)
    fast.set_backend(backend)
    dec.adopt(prompt)
    dec._tok.fill_(token)
    dec.use_graph = True  # _step then passes the position as a device tensor, as in the captured graph
    key = dec.sampling_key()
    if sampled:  # the values generate() would put in the step's buffers
        key = dec.sampling_key(0.8, 50, 0.95)
        dec._temp.fill_(0.8)
        dec._top_p.fill_(0.95)
    # a first step makes what the variant makes once (counters), as a graph's warm-up steps
    # do before the capture; then the state goes back and the counted step runs at the same position
    saved = [b.clone() for b in dec._state]
    dec._step(key)
    dec._restore(saved)
    with counted_loads() as loads, counted_launches() as launches:
        dec._step(key)
    loads = by_size(loads)
    out: dict = {kind: reads_of(loads, ts) for kind, ts in regions(fast).items()}
    total = sum(a.size * item for item, a in loads.items())
    out["other"] = total - sum(r.read for r in out.values())
    out["total"] = total
    # the cache [L, B, Hkv, S, Dh] (k then v), element-wise: read at which positions
    kv = out["KV cache"].mask.reshape(2, *net.cache_k.shape[:-1], -1)  # [2, L, B, Hkv, S, Dh · bytes]
    by_pos = kv.any(axis=(0, 1, 2, 3, 5))  # [S]
    read_pos = np.flatnonzero(by_pos)
    out["kv_positions"] = (int(read_pos.min()), int(read_pos.max())) if read_pos.size else None
    # the step's own key / value (position pos) may come from registers, not the cache
    out["kv_filled"] = bool(kv[:, :, :, :, :pos].all()) and not by_pos[pos + 1 :].any()
    out["launches"] = launches
    return out


def run(fast_for, prompt: list[int], token: int, variants: list[Variant], sampled: bool = False) -> list[dict]:
    """``step_traffic`` of each variant; ``fast_for(variant)`` makes its FastModel."""
    rows = []
    for v in variants:
        rows.append({"variant": v.name, **step_traffic(fast_for(v), prompt, token, sampled)})
    return rows


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f}" if n >= 1e5 else f"{n / 1e3:.1f} k"


def print_table(rows: list[dict]) -> None:
    kinds = ["t2 weights", "scales", "norms", "KV cache", "int8 head"]
    print("bytes read by the Triton kernels of one graph decode step (MB, or k for kB); x: reads per byte read")
    print("| variant | " + " | ".join(kinds) + " | other | total | launches (Triton + torch) |")
    print("|---" * (len(kinds) + 4) + "|")
    for row in rows:
        cells = []
        for k in kinds:
            r = row.get(k)
            if r is None or not r.read:
                cells.append("-")
                continue
            cell = f"{_mb(r.read)} ({r.read / r.distinct:.2f}x"
            cell += f", {r.distinct / r.size:.0%} of it)" if r.distinct != r.size else ", all)"
            cells.append(cell)
        n = row["launches"]
        triton = sum(c for k, c in n.items() if k.startswith("triton"))
        launches = f"{sum(n.values())} ({triton} + {sum(n.values()) - triton})"
        print(f"| {row['variant']} | " + " | ".join(cells) + f" | {_mb(row['other'])} | {_mb(row['total'])} | {launches} |")
    for row in rows:
        w = row["t2 weights"]
        flag = "" if w.read == w.distinct == w.size and row["kv_filled"] else "   <-- CHECK"
        print(f"{row['variant']}: t2 weights read {w.read / w.size:.3f}x their size; KV cache positions "
              f"{row['kv_positions']} read, exactly the filled ones: {row['kv_filled']}{flag}")  # fmt: skip


def _jsonable(rows: list[dict]) -> list[dict]:
    return [{k: ({"read": v.read, "distinct": v.distinct, "size": v.size} if isinstance(v, Reads) else v)
             for k, v in row.items()} for row in rows]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", help="packed or GGUF model file (default: the demo model, converted here)")
    ap.add_argument("--shape-2b4t", type=int, metavar="LAYERS",
                    help="instead: a random model of the 2B-4T widths with this many layers and a 512-token vocab")
    ap.add_argument("--prompt-len", type=int, default=20, help="positions filled before the counted step")
    ap.add_argument("--variants", help="comma-separated variant numbers (0-based) of: " + "; ".join(v.name for v in VARIANTS))
    ap.add_argument("--sampled", action="store_true", help="count the sampled step (temperature 0.8, top-k 50, "
                    "top-p 0.95) instead of the greedy one")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    from bitnet158.runtime import load
    from bitnet158.runtime.fast import FastModel

    variants = [VARIANTS[int(i)] for i in args.variants.split(",")] if args.variants else VARIANTS
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape_2b4t:
            from bitnet158.converter.random_model import model_config, write_random_model

            path = Path(tmp) / "shape.bin"  # bitnet-convert random 2b4t --layers N --vocab 512
            write_random_model(path, model_config("2b4t", layers=args.shape_2b4t, vocab=512), progress=False)
            label = f"random, 2B-4T widths, {args.shape_2b4t} layer(s), vocab 512"
        elif args.file:
            path, label = Path(args.file), args.file
        else:
            from bitnet158.converter.hf import convert_hf

            path, label = Path(tmp) / "tiny.bin", "examples/tiny-bitnet (demo model)"
            convert_hf(str(ROOT / "examples" / "tiny-bitnet"), str(path), progress=False)
        model = load(str(path), device="cpu", reference=True)
    net = model.net
    vocab = net.config.vocab_size
    prompt = [(7 * i + 3) % vocab for i in range(args.prompt_len)]
    rows = run(lambda v: FastModel(net, backend="triton", **v.opts), prompt, 5 % vocab, variants, args.sampled)
    c = net.config
    print(f"model: {label}: hidden {c.hidden_size}, intermediate {c.intermediate_size}, {c.num_hidden_layers} layers, "
          f"{c.num_attention_heads}/{c.num_key_value_heads} heads; counted {'sampled' if args.sampled else 'greedy'} step "
          f"at position {args.prompt_len}")  # fmt: skip
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(rows), indent=1))
    bad = [r["variant"] for r in rows if not (r["t2 weights"].read == r["t2 weights"].distinct == r["t2 weights"].size and r["kv_filled"])]
    if bad:
        print(f"FAIL: {bad} read a weight byte more than once or none, or the KV cache outside its filled positions", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
