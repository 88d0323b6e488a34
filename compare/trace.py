"""Where two runs of the same network part: every ternary linear's input, in forward order, on both sides.

    report = trace(a, b, ids)  # our runtime's model (reference path, fp32) or compare/reference.py's

Why: int8 activation rounding makes a long run chaotic. Where two implementations sum in another order, an
activation at a rounding tie (x·s = k + ½ to float precision) goes to k on one side and k + 1 on the other; the
next linears' inputs then differ by that step, which flips more near-ties, layer after layer and, through the keys
and values, position after position (README: a random 2B-4T-shaped model turns one tie into KL 0.44). So a large
logit difference cannot tell a bug from rounding. This can:
- walk the linears in forward order, keeping the first position that a rounding flip has reached: a flip at
  position p in any linear reaches positions ≥ p of every later linear (the residual carries it, the attention's
  keys and values spread it to later positions, never to earlier ones);
- the inputs at positions no flip has reached must agree to float rounding (TOLERANCE of their largest value);
  the first linear whose inputs do not is where the two networks compute something different.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from bitnet158.compare.core import CompareError
from bitnet158.compare.reference import TransformersModel
from bitnet158.runtime.bitlinear import BitLinear, quantize_activations

# What float rounding alone moves an input by, of its largest value, in fp32: 2-3e-7 through sums in another order
# (README), 3.7e-4 where a random network's huge attention scores make the softmax amplify it (gone in fp64). A
# wrong sub-norm or activation moved them by 0.3 and 0.55 (README)
TOLERANCE = 1e-2
TRACE_TOKENS = 64  # the first tokens only: every linear's input is kept, [tokens, in_features] fp32 each


@dataclass
class Trace:
    """``verdict``: "agree" (no input rounds differently), "rounding" (every difference follows from a rounding
    flip), "differ" (an input that no flip has reached differs beyond TOLERANCE, at ``differ_at``), or
    "inconclusive" (flips reached position 0 before linear ``blind``, so no input of it or of any later linear
    could be checked: a wrong layer there would pass)."""

    verdict: str
    tokens: int
    linears: int
    max_rel: float  # the largest relative difference of inputs no flip had reached (at differ_at, if it differs)
    checked: int  # how many (linear, position) inputs no flip had reached: what the verdict rests on
    first_flip: str | None = None  # "LINEAR, position P": the first input that rounds differently
    differ_at: str | None = None
    blind: str | None = None  # the first linear that no position of could be checked (inconclusive)

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.describe()}

    def describe(self) -> str:
        if self.verdict == "differ":
            return (f"DIFFER at {self.differ_at}: inputs {self.max_rel:.2g} apart (of their largest value) before "
                    "any rounding flip reached them")
        agree = (f"the inputs agree to {self.max_rel:.2g} of their largest value where no int8 rounding flip had "
                 f"reached them ({self.checked} of {self.linears} linears × {self.tokens} positions)")
        if self.verdict == "agree":
            return f"agree: {agree}; no flip"
        if self.verdict == "inconclusive":
            return (f"INCONCLUSIVE: rounding flips (the first at {self.first_flip}) reached position 0 before "
                    f"{self.blind}, which no input of, nor of any later linear, could be checked ({self.checked} of "
                    f"{self.linears} linears × {self.tokens} positions); compare f32 files (bitnet-convert "
                    "hf-to-packed --dtype f32), or a text whose first tokens round alike")
        return f"rounding: {agree}; the first flip at {self.first_flip}"


def linears(model) -> list[tuple[str, torch.nn.Module]]:
    """The ternary linears of ``model`` in forward order: q, k, v, o, gate, up, down of each layer."""
    if isinstance(model, TransformersModel):
        return [(n, m) for n, m in model.model.named_modules() if n.startswith("model.layers.") and n.endswith("_proj")]
    return [(n, m) for n, m in model.net.named_modules() if isinstance(m, BitLinear)]


def _inputs(model, ids: list[int]) -> list[torch.Tensor]:
    # one forward of ids; each linear's input [T, K] in fp32 on the CPU, in call order
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()[0].float().cpu()))
             for _, m in linears(model)]  # fmt: skip
    try:
        model.logits(ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def walk(names: list[str], xs_a: list[torch.Tensor], xs_b: list[torch.Tensor]) -> Trace:
    """The verdict over inputs [T, K] of the same linears in forward order (the module docstring)."""
    if not len(names) == len(xs_a) == len(xs_b):
        raise CompareError(f"the trace needs the same linears on both sides: A ran {len(xs_a)} of {len(names)}, "
                           f"B ran {len(xs_b)}")
    tokens = xs_a[0].shape[0] if xs_a else 0
    clean = tokens  # positions < clean: no rounding flip has reached them
    first_flip, worst, checked, blind = None, 0.0, 0, None
    for name, xa, xb in zip(names, xs_a, xs_b):
        if xa.shape != xb.shape:
            raise CompareError(f"the trace needs the same linears on both sides: {name} takes {tuple(xa.shape)} "
                               f"in A, {tuple(xb.shape)} in B")
        if clean:
            rel = (xa[:clean] - xb[:clean]).abs().amax(-1) / xa[:clean].abs().amax(-1).clamp(min=1e-30)  # [clean]
            p = int(rel.argmax())
            worst = max(worst, float(rel[p]))
            if rel[p] > TOLERANCE:
                return Trace("differ", tokens, len(names), float(rel[p]), checked, first_flip, f"{name}, position {p}")
            checked += clean
        elif blind is None:
            blind = name
        flipped = (quantize_activations(xa)[0] != quantize_activations(xb)[0]).any(-1).nonzero()  # [n, 1]
        if flipped.numel() and int(flipped[0]) < clean:
            clean = int(flipped[0])
            first_flip = first_flip or f"{name}, position {clean}"
    verdict = "agree" if first_flip is None else "rounding" if blind is None else "inconclusive"
    return Trace(verdict, tokens, len(names), worst, checked, first_flip, blind=blind)


def trace(a, b, ids: list[int]) -> Trace:
    """Run both models on the first TRACE_TOKENS of ids, recording every linear's input, and walk them."""
    ids = ids[:TRACE_TOKENS]
    with torch.inference_mode():
        xs_a, xs_b = _inputs(a, ids), _inputs(b, ids)
    return walk([n for n, _ in linears(a)], xs_a, xs_b)
