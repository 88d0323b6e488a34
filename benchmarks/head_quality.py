#!/usr/bin/env python3
"""What the int8 output head (``bitnet-run --head int8``, ``FastModel(head="int8")``) does to a trained model:
perplexity, logits and greedy tokens against the model's own head, on the same weights, in one run.

    python benchmarks/head_quality.py                      # the demo model (examples/tiny-bitnet) on examples/heldout.txt
    python benchmarks/head_quality.py --file model.bin --text wiki.test.raw --ctx 512 --json head.json

Why: the int8 head takes 44 % of the bytes off a 2B-4T decode token (benchmarks/RESULTS.md), but it rounds each
row of the head to 255 levels, and the normed hidden state too. A random model cannot say what that costs (its
logits are nearly flat); a trained one can. The windows and the scored tokens are those of ``bitnet-run
--perplexity`` (runtime/perplexity.py), and the bf16 figure is checked against it. On the CPU the int8 head is its
arithmetic in torch (FastModel's reference backend: the exact integer dot, which tests/test_kernels.py checks
against the kernel); on CUDA, the Triton kernel. Nothing here is a timing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
HEADS = ("bf16", "int8")


def demo_file(tmp: str) -> Path:
    """The demo model converted to a packed file in ``tmp``."""
    from bitnet158.converter.hf import convert_hf

    out = Path(tmp) / "tiny.bin"
    convert_hf(str(ROOT / "examples" / "tiny-bitnet"), str(out), progress=False)
    return out


@torch.inference_mode()  # the KV cache holds inference tensors
def compare(fast, ids: list[int], ctx: int, stride: int) -> dict:
    """Both heads over the windows of runtime/perplexity.py: each head's perplexity, and over the scored positions
    the int8 logits against the bf16 ones (relative error, top-1 agreement, mean KL(bf16 ‖ int8))."""
    from bitnet158.runtime.perplexity import window_plan

    net = fast.net
    net.setup_cache(1, min(ctx, len(ids)))
    tokens = torch.tensor(ids, device=net.device)
    nll = dict.fromkeys(HEADS, 0.0)
    diff2 = ref2 = kl = 0.0
    agree = count = 0
    for b, e, first in window_plan(len(ids), ctx, stride):
        rows, logp = {}, {}
        for head in HEADS:
            fast.set_head(head)
            rows[head] = fast.logits(tokens[b:e][None], 0, last_only=False)[0, first - 1 - b : e - 1 - b].double()
            logp[head] = torch.log_softmax(rows[head], dim=-1)  # rows predict positions first..e-1
            nll[head] -= float(logp[head].gather(1, tokens[first:e, None]).sum())
        ref, got = rows["bf16"], rows["int8"]
        diff2 += float((got - ref).square().sum())
        ref2 += float(ref.square().sum())
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        kl += float((logp["bf16"].exp() * (logp["bf16"] - logp["int8"])).sum())
        count += e - first
    fast.set_head("bf16")
    return {
        "tokens_scored": count,
        "ppl_bf16": math.exp(nll["bf16"] / count),
        "ppl_int8": math.exp(nll["int8"] / count),
        "logits_rel_err": math.sqrt(diff2 / ref2),
        "top1_agreement": agree / count,
        "kl_mean": kl / count,
    }


@torch.inference_mode()
def greedy_agreement(fast, ids: list[int], prompts: int, prompt_len: int, n: int) -> dict:
    """Greedy continuations of ``prompts`` slices of the text under both heads (the runtime's decoder, steps at
    host positions): the tokens before the first difference, and how many continuations are identical."""
    from bitnet158.runtime.fast import GraphDecoder

    starts = [i * max(1, (len(ids) - prompt_len) // prompts) for i in range(prompts)]
    same, identical = 0, 0
    for s in starts:
        prompt = ids[s : s + prompt_len]
        runs = {}
        for head in HEADS:
            fast.set_head(head)
            runs[head] = list(GraphDecoder(fast, len(prompt) + n, use_graph=False).generate(prompt, n))
        k = next((i for i, (a, b) in enumerate(zip(runs["bf16"], runs["int8"])) if a != b), n)
        same += k
        identical += k == n
    fast.set_head("bf16")
    return {"prompts": prompts, "new_tokens": n, "tokens_before_first_difference": same / prompts, "identical": identical}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", help="packed or GGUF model file (default: the demo model, converted here)")
    ap.add_argument("--text", default=str(ROOT / "examples" / "heldout.txt"), help="text to score")
    ap.add_argument("--ctx", type=int, help="window (default: the model context)")
    ap.add_argument("--stride", type=int, help="window step (default: ctx // 2)")
    ap.add_argument("--prompts", type=int, default=8, help="greedy continuations to compare")
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens of each greedy continuation")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    from bitnet158.runtime import load
    from bitnet158.runtime.fast import FastModel

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.file) if args.file else demo_file(tmp)
        model = load(str(path), device=args.device, reference=True)
    cuda = model.device.type == "cuda"
    fast = FastModel(model.net, backend="triton" if cuda else "reference")
    text = Path(args.text).read_text(encoding="utf-8")
    ids = model.tokenizer.encode(text, add_special_tokens=True)
    ctx = min(args.ctx or model.config.max_position_embeddings, len(ids))
    stride = args.stride or max(1, ctx // 2)
    res = compare(fast, ids, ctx, stride)
    check, _ = model.perplexity(text, ctx=ctx, stride=stride)  # bitnet-run --perplexity, the model's own head
    res.update(greedy_agreement(fast, ids, args.prompts, min(32, len(ids) // 2), args.new_tokens))
    res.update(model=str(args.file or "examples/tiny-bitnet"), text=os.path.relpath(args.text), ctx=ctx, stride=stride,
               device=str(model.device), dtype=str(model.dtype).removeprefix("torch."), ppl_bitnet_run=check)  # fmt: skip
    print(f"model {res['model']} on {res['device']} ({res['dtype']}), text {res['text']}: {res['tokens_scored']} tokens "
          f"scored, windows of {ctx} every {stride}")  # fmt: skip
    print(f"perplexity: bf16 head {res['ppl_bf16']:.4f} (bitnet-run --perplexity: {check:.4f}), int8 head "
          f"{res['ppl_int8']:.4f} ({100 * (res['ppl_int8'] / res['ppl_bf16'] - 1):+.2f} %)")  # fmt: skip
    print(f"int8 logits vs bf16: rel err {res['logits_rel_err']:.2e}, top-1 agreement {res['top1_agreement']:.4f}, "
          f"mean KL(bf16‖int8) {res['kl_mean']:.2e} nats")  # fmt: skip
    print(f"greedy: {res['identical']} of {res['prompts']} continuations of {res['new_tokens']} tokens identical; "
          f"{res['tokens_before_first_difference']:.1f} tokens on average before the first difference")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if not math.isclose(res["ppl_bf16"], check, rel_tol=1e-6):
        print("FAIL: the bf16 head's perplexity is not bitnet-run's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
