"""The fast path around a loaded ``Transformer``: fused projections, an int8 head, CUDA-graph decode (GPU), and
the compiled decode step of runtime/cpu.py (CPU).

    fast = FastModel(net, head="bf16" | "int8", backend="triton")   # fuses q/k/v and gate/up at load time
    fast = FastModel(net, backend="cpu")                           # CPU: decode steps through runtime/cpu.py
    dec = GraphDecoder(fast, max_seq=1024, compile=False)          # static KV cache, one decode step per replay
    for tok in dec.generate(prompt_ids, 256, temperature=0.7, seed=0): ...

What it changes, and why:
- **Fused projections.** q/k/v become one t2 matrix [Nq + 2·Nkv, D] and gate/up one [2·I, D]: the t2 layout packs
  along the input dim inside each row, so fusing is a row concat. Each segment keeps its own scale, as a per-row
  scale vector (REFERENCE §8: Microsoft's kernel applies one scale to the wrong rows). The original BitLinear
  layers are re-pointed at their rows of the fused bytes, so the weights stay in memory once and the reference
  network still runs unchanged.
- **Fewer launches per token.** With the "triton" backend the RMSNorms (the one after attention together with
  the residual add) and the MLP's act(gate)·up + sub-norm run as single Triton kernels.
- **Decode-step kernels** (the "triton" backend; the defaults are the fastest combination measured,
  benchmarks/RESULTS.md: 928-981 tok/s at the 2B-4T shape on an H100, 944-1,078 on an H200, against 396 for the
  first graph step):
  - ``attention="split"`` (default): in the graph decode step (one token, batch 1, position on the device) rope,
    the KV-cache write and the attention over the filled positions run as ``kernels.decode_attention``,
    flash-decoding style: H × up to 16 programs over chunks of the cache, then a combine kernel. "folded" (with
    gemv="packed"; no faster than "split" on an H200, 934-950 against 944-982 tok/s): the same launch also does
    the combine (the last split of each head to finish) and the o projection's ``pack_act`` (the last head), as
    gemv="folded"'s attention does, so a layer takes eight launches, not ten, while its GEMVs stay "packed"'s.
    With the other GEMVs it runs as "split" ("folded" folds the attention anyway). "triton" is the
    same in one kernel of H programs; "torch" the model's own ops over the whole static cache (~15 launches).
  - ``gemv=`` (inputs of up to ``GEMV_MAX_M`` rows):
    - "packed" (default): ``kernels.pack_act`` (norm / act·up, quantization, packing: once per input) before
      each GEMV, whose loop is then a shift, a mask and a dp4a per field (``kernels.bitlinear_gemv_packed``,
      residual adds in its epilogue): ten launches a layer with the split attention;
    - "plain": norm kernels, then GEMVs that quantize their input inside the weight loop;
    - "folded" (measured slower than "packed" on an H200, 803 against 813 tok/s): "packed" with each ``pack_act``
      done by the last program of the kernel that produces its input (``kernels.NextPack``, an atomic counter
      per launch): with the split attention, five launches a layer (qkv, attention + combine + pack, o,
      gate|up, down), and the layer's input packed by the layer before.
    (A persistent step, every layer in one launch with flags in place of kernel boundaries, measured 23-40 %
    slower than "packed" on an H200 and was removed: benchmarks/RESULTS.md.)
  - ``pdl=True`` (default) launches those kernels, the attention kernels and the int8 head with programmatic
    dependent launch (sm_90+; ignored elsewhere), so that each launch overlaps the end of the kernel before it:
    each kernel lets the next one launch once its own wait for the one before is over. ``pdl="early"`` (not
    measured yet): before that wait, so a kernel can be resident, its weights in flight, while the two before it
    still run, and the launches of the chain overlap more than one kernel (``kernels._pdl_enter``: the same
    waits, so the same values; benchmarks/RESULTS.md has the prediction). ``pdl="early-packs"`` (not measured
    yet): the early trigger only in the kernels that read no weights (each ``pack_act``, the attention's
    combine), so each GEMV is resident with its weights in flight while the GEMV before it runs, and no launch
    runs further ahead than that (the bound, should blocks waiting early crowd out the running kernel's).
  - ``argmax="triton"`` (default): the step's pick over the vocabulary in one launch: the greedy argmax
    (``kernels.argmax``, 2.8 µs on an H200, against torch's reduction: 28 µs) and the top-k / top-p / min-p
    draw (``kernels.sample``: with a top-k ≤ ``kernels.SAMPLE_MAX_K`` one launch, 924-956 tok/s against 780-790
    with torch's ops for top-k 50 + top-p 0.95 on an H100; without a top-k a radix select of the top-p cut in
    nine launches, 951-1,012 tok/s against 818-822 for torch's ops, which sort the vocabulary); "torch" keeps
    torch's ops for both, as does a top-k above SAMPLE_MAX_K.
  - ``tiles="searched"`` (default): the graph step's packed GEMV tiles are chosen per site (q/k/v, o, gate|up,
    down) by timing the whole decode step with each tile (``GraphDecoder.search_tiles``, once per model, before
    the first capture), then the warps of the ``pack_act`` before each the same way (``kernels.PACK_WARPS``: a
    pack is one program, so its warps set how long its chain of instructions takes; 4, 8 and 16 warps timed
    within 1 % of each other on an H100 and an H200); "autotune" leaves the tiles to Triton's autotuner, which
    times each GEMV alone and picked tiles 4 % slower in the step on an H200, and the packs at
    ``kernels.pack_act_launch``'s warps.
  - ``prefetch="after"`` ("off" by default: it gained nothing steady on an H200, 847 and 972 against 944-982
    tok/s): the attention kernels, once done, bring the weights of the layer's o,
    gate|up and down GEMVs and of the next layer's q/k/v into L2, while the combine and the packing (which read
    no weights) run, so that those GEMVs read from L2 what each would otherwise wait on memory for. "before": the
    same, issued before the attention's wait for the q/k/v GEMV (so during it: earlier, but competing with its
    reads).
  Other backends ("reference", "triton_op" under torch.compile, "cpu") run the model's attention ops and the
  plain BitLinear path whatever these options say.
- **Fewer bytes per token.** Decode only computes the head for the last position; ``head="int8"`` replaces the
  bf16 head (56 % of the bytes of a 2B-4T token) by per-row int8 weights (runtime/bitlinear.py's
  ``quantize_head``) and the dp4a GEMV of kernels.py; on the other backends, ``int8_head_logits``'s exact
  integer dot (the CPU's: one int8 GEMV in oneDNN).
- **No host work per token.** ``GraphDecoder`` captures one decode step (forward at a position tensor, sampling
  on the device with the repetition penalty over a mask of the ids seen, next token and position written into
  static buffers: ``kernels.advance``, one launch, on the triton backend) in a ``torch.cuda.CUDAGraph`` and
  replays it; generated ids are copied to the host in chunks.
  ``generate(reuse=True)`` runs only what follows the prefix that the cache holds from the last generation (a
  chat's next turn). ``compile=True`` first passes the forward through
  ``torch.compile`` (the BitLinear kernels as opaque custom ops) so that the small elementwise ops fuse.
- **CPU** (``backend="cpu"``): a one-token step runs each layer as one compiled function of runtime/cpu.py (the
  shared ``model.attend`` inside), and the head reads the network's head in its stored dtype (bf16 or f16 when the
  loader kept it narrow: runtime/loader.py's ``narrow_dtype``) with fp32 products. Prompts
  (several tokens) run ``_layer`` with the reference arithmetic. If compiling fails on the first step, the model
  falls back to the reference backend with a warning.

The forward here mirrors ``Transformer.forward`` (runtime/model.py) operation for operation, only reordered by
the fusions; tests/test_kernels.py checks it against the reference network.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from bitnet158.runtime.bitlinear import BitLinear, get_backend, int8_head_logits, quantize_head, register_backend
from bitnet158.runtime.generate import GenerationStats, _sync
from bitnet158.runtime.model import Transformer
from bitnet158.runtime.sampling import SamplingError, SamplingParams, check_finite, filter_logits

log = logging.getLogger(__name__)

HEADS = ("bf16", "int8")
ATTENTIONS = ("torch", "triton", "split", "folded")
GEMVS = ("plain", "packed", "folded")
ARGMAXES = ("torch", "triton")
TILES = ("searched", "autotune")
PREFETCHES = ("off", "after", "before")  # FastModel(prefetch=): when the attention brings the next weights into L2
# FastModel(pdl=): programmatic dependent launch off, on, on with the early trigger in every kernel or only in
# the packs and the combine (kernels.PDL_MODES)
PDLS = (False, True, "early", "early-packs")
SITES = ("qkv", "o", "gate_up", "down")  # a layer's four packed GEMVs, in order
# the decode position GraphDecoder.search_tiles times the step at (attention over 256 keys), or the last slot of a
# smaller cache
SEARCH_POS = 256


def _norm_args(norm) -> tuple[torch.Tensor | None, float]:
    # an RMSNorm module (or None: no norm) as the kernels take it: (weight or None, eps)
    return (norm.weight, norm.eps) if norm is not None else (None, 0.0)


class FastPathError(ValueError):
    """The fast path cannot run this model / request (shapes, device, sampling options)."""


def fuse_bitlinears(parts: Sequence[BitLinear]) -> BitLinear:
    """One BitLinear whose rows are ``parts``' rows in order, each segment with its own scale (per-row vector).

    The parts are re-pointed at their rows of the fused bytes (views), so no weight is held twice.
    """
    k = parts[0].in_features
    if any(p.in_features != k for p in parts):
        raise FastPathError(f"fuse_bitlinears: in_features differ: {[p.in_features for p in parts]}")
    packed = torch.cat([p.packed for p in parts])  # [ΣN, ceil(K/4)]: t2 rows are independent
    scale = torch.cat([p.scale.expand(p.out_features) for p in parts]).contiguous()  # f32 [ΣN]
    fused = BitLinear(packed, scale, k)
    fused.backend = parts[0].backend
    row = 0
    for p in parts:  # each part re-pointed at its rows of the fused bytes, in order (views: no copy)
        p.packed = packed[row : row + p.out_features]
        row += p.out_features
    return fused


def _register_op_backend() -> None:
    # "triton_op": the same kernels behind torch.library custom ops, which torch.compile keeps opaque
    from bitnet158.runtime import kernels

    register_backend("triton_op", kernels.bitlinear_op)


class FastModel:
    """Decode/prefill forward over a loaded ``Transformer`` with fused projections and an optional int8 head."""

    def __init__(
        self, net: Transformer, *, head: str = "bf16", backend: str = "triton", attention: str = "split",
        gemv: str = "packed", pdl: bool | str = True, argmax: str = "triton", tiles: str = "searched", prefetch: str = "off",
    ):  # fmt: skip
        if attention not in ATTENTIONS:
            raise FastPathError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if gemv not in GEMVS:
            raise FastPathError(f"gemv must be one of {GEMVS}, got {gemv!r}")
        if argmax not in ARGMAXES:
            raise FastPathError(f"argmax must be one of {ARGMAXES}, got {argmax!r}")
        if tiles not in TILES:
            raise FastPathError(f"tiles must be one of {TILES}, got {tiles!r}")
        if prefetch not in PREFETCHES:
            raise FastPathError(f"prefetch must be one of {PREFETCHES}, got {prefetch!r}")
        if pdl not in PDLS:
            raise FastPathError(f"pdl must be one of {PDLS}, got {pdl!r}")
        self.argmax = argmax  # the step's pick: torch's ops, or one kernel (argmax, sample) on backend "triton"
        self.tiles = tiles  # the graph step's packed GEMV tiles: "searched" (GraphDecoder.search_tiles) or "autotune"
        self.tile_pick: dict[str, tuple[int, int, int]] | None = None  # search_tiles' tile per site, once made
        self.tile_times: dict[str, dict[tuple[int, int, int], float]] = {}  # its µs a step, per site and tile
        self.pack_pick: dict[str, int] | None = None  # search_tiles' warps for each site's pack_act, once made
        self.pack_times: dict[str, dict[int, float]] = {}  # its µs a step, per site and warps
        self._pick_counter: torch.Tensor | None = None  # their int32 counter (zero), made on first use
        self.attention = attention  # "triton" / "split" / "folded": the graph decode step's attention kernel(s) (kernels.py)
        self.gemv = gemv  # the decode GEMV variant (the module docstring)
        self.pdl = pdl  # programmatic dependent launch for the packed / folded / attention / int8 head kernels
        self.prefetch = prefetch  # "after" / "before": the attention brings the next weights into L2 (_prefetch_after)
        self._fusable: list[bool] | None = None  # per layer: every matrix readable by the GEMV (made when needed)
        self._counters: torch.Tensor | None = None  # gemv="folded": int32 [layers, 4 sites, width], all zero
        self.net = net
        self.config = net.config
        self.qkv: list[BitLinear] = []
        self.gate_up: list[BitLinear] = []
        for layer in net.layers:
            a, m = layer.attn, layer.mlp
            self.qkv.append(fuse_bitlinears([a.q_proj, a.k_proj, a.v_proj]))
            self.gate_up.append(fuse_bitlinears([m.gate_proj, m.up_proj]))
        self._cpu_compiled = False  # runtime/cpu.py's functions ran once (compiled) on this model
        self._cpu_any_pos = False  # a step at a position >= 2 compiled the layer for every position (warm_up)
        self._cpu_weights: list | None = None  # per layer cpu.LayerWeights, made at the first CPU step
        self.set_backend(backend)
        self.head = "bf16"
        self.head_q: torch.Tensor | None = None  # int8 [V, ceil(D/4)·4], made on the first set_head("int8")
        self.head_scale: torch.Tensor | None = None  # f32 [V]
        self.set_head(head)

    def set_head(self, head: str) -> None:
        """Use the bf16 head (the network's) or the int8 one (quantized per row once, then kept)."""
        if head not in HEADS:
            raise FastPathError(f"head must be one of {HEADS}, got {head!r}")
        if head == "int8" and self.head_q is None:
            self.head_q, self.head_scale = quantize_head(self.net.head)
        self.head = head

    @property
    def device(self) -> torch.device:
        return self.net.device

    def set_backend(self, backend: str) -> None:
        """Route every BitLinear of the network and the fused ones through ``backend``."""
        if backend == "triton_op":
            _register_op_backend()
        get_backend(backend)
        self.backend = backend
        # the Triton norm / activation kernels go with the eager Triton backend; torch.compile ("triton_op")
        # fuses those ops itself, and the reference backend keeps the model's own torch ops
        self.fused_elementwise = backend == "triton"
        for lin in [*self.qkv, *self.gate_up, *(m for m in self.net.modules() if isinstance(m, BitLinear))]:
            lin.backend = backend

    def resident_bytes(self) -> int:
        """Weight bytes on the device: the network's (fused rows counted once) plus the int8 head once made."""
        n = self.net.resident_weight_bytes()
        if self.head_q is not None:
            n += self.head_q.numel() + self.head_scale.numel() * 4
        return n

    def _norm(self, norm, x: torch.Tensor, residual: torch.Tensor | None = None):
        # RMSNorm module ``norm`` of x, or with ``residual``: (h = residual + x, norm(h))
        if self.fused_elementwise:
            from bitnet158.runtime.kernels import rmsnorm

            return rmsnorm(x, norm.weight, norm.eps, residual)
        if residual is None:
            return norm(x)
        h = residual + x
        return h, norm(h)

    def _layer(self, i: int, x: torch.Tensor, cos, sin, pos, mask, carry=None):
        # x [B, T, D] → ([B, T, D], carry); the operations of Block/Attention/MLP.forward with fused projections.
        # carry: with gemv="folded", layer i's input already normed and packed (kernels.PackedAct) by layer i − 1
        if self._packed_gemv(i, x):
            if self.gemv == "folded":
                return self._folded_layer(i, x, cos, sin, pos, mask, carry)
            return self._packed_layer(i, x, cos, sin, pos, mask), None
        layer = self.net.layers[i]
        a, m = layer.attn, layer.mlp
        qkv = self.qkv[i](self._norm(layer.attn_norm, x))  # [B, T, Nq + 2·Nkv]
        y = self._attend(i, qkv, cos, sin, pos, mask)  # [B, T, Nq]
        if a.sub_norm is not None:
            y = self._norm(a.sub_norm, y)
        h, n = self._norm(layer.mlp_norm, a.o_proj(y), residual=x)  # h = x + attn; n = mlp_norm(h)
        gu = self.gate_up[i](n)  # [B, T, 2·I]
        if self.fused_elementwise:
            from bitnet158.runtime.kernels import act_mul_norm

            z = act_mul_norm(gu, *_norm_args(m.sub_norm), m.relu2)
        else:
            g, u = gu.split([gu.shape[-1] // 2] * 2, dim=-1)  # [B, T, I] each
            g = torch.square(F.relu(g)) if m.relu2 else F.silu(g)
            z = g * u
            if m.sub_norm is not None:
                z = m.sub_norm(z)
        return h + m.down_proj(z), None

    def _graph_step(self, tokens_shape, pos) -> bool:
        # the graph decode step on the triton backend: one token (tokens_shape [B, T, ...] starts with 1, 1), its
        # position on the device
        return self.backend == "triton" and not isinstance(pos, int) and tuple(tokens_shape[:2]) == (1, 1)

    def _attention_kernel(self, x: torch.Tensor, pos) -> bool:
        # the attention kernels apply to the graph decode step (x [B, T, ...]: the tokens, or a layer's q/k/v)
        return self.attention != "torch" and self._graph_step(x.shape, pos)

    def _attend(self, i: int, qkv: torch.Tensor, cos, sin, pos, mask, pack_next=None):
        # qkv [B, T, Nq + 2·Nkv] → attention output [B, T, Nq] (before the sub-norm), keys/values into the cache.
        # cos / sin: the rows of the positions [T, Dh], or for the attention kernels the whole tables (_hidden).
        # pack_next (kernels.NextPack; the split attention kernel only): → the o projection's packed input instead
        a = self.net.layers[i].attn
        if self._attention_kernel(qkv, pos):
            from bitnet158.runtime.kernels import decode_attention

            c = a.cache
            split = self.attention != "triton"
            out = decode_attention(qkv, cos, sin, pos, c.k, c.v, a.n_heads, a.n_kv, a.head_dim, pdl=self.pdl, split=split,
                                   pack_next=pack_next, prefetch=self._prefetch_after(i), prefetch_early=self.prefetch == "before")  # fmt: skip
            return out if pack_next is None else out[1]
        nq, nkv = a.n_heads * a.head_dim, a.n_kv * a.head_dim
        return a.attend(*qkv.split([nq, nkv, nkv], dim=-1), cos, sin, pos, mask)

    def _prefetch_after(self, i: int) -> list[torch.Tensor]:
        # with prefetch: the t2 bytes the GEMVs after layer i's attention read, in the order they read them (o,
        # gate|up, down, then layer i + 1's q/k/v), 17 MB at the 2B-4T shape: the attention's programs bring them
        # into L2 (kernels.decode_attention), where the 50-60 MB of an H100 / H200 hold them until they are read
        if self.prefetch == "off":
            return []
        layer = self.net.layers[i]
        out = [layer.attn.o_proj.packed, self.gate_up[i].packed, layer.mlp.down_proj.packed]
        if i + 1 < len(self.net.layers):
            out.append(self.qkv[i + 1].packed)
        return out

    def _packed_gemv(self, i: int, x: torch.Tensor) -> bool:
        # gemv="packed" / "folded" apply to decode-sized inputs on the triton backend, for layers whose rows are
        # whole int32 words
        from bitnet158.runtime import kernels

        if self.gemv == "plain" or self.backend != "triton" or x.shape[0] * x.shape[1] > kernels.GEMV_MAX_M:
            return False
        return self._fusable_layers()[i]

    def site_linears(self, i: int) -> tuple[BitLinear, BitLinear, BitLinear, BitLinear]:
        """Layer i's four GEMV matrices, in SITES order: q/k/v (fused), o, gate|up (fused), down."""
        layer = self.net.layers[i]
        return self.qkv[i], layer.attn.o_proj, self.gate_up[i], layer.mlp.down_proj

    def _fusable_layers(self) -> list[bool]:
        # per layer: every matrix of it readable by the packed GEMVs (rows of whole int32 words)
        from bitnet158.runtime import kernels

        if self._fusable is None:
            self._fusable = [all(kernels.gemv_compatible(lin.packed) for lin in self.site_linears(j)) for j in range(len(self.net.layers))]
            if not all(self._fusable):
                log.info("gemv=%r: some layers' rows are not whole int32 words; those run the plain path", self.gemv)
        return self._fusable

    def _pack(self, inp: torch.Tensor, k: int, norm, act: str | None = None, site: str | None = None):
        # inp [M, K] (gate | up [M, 2K] with act) → kernels.PackedAct of norm?(act?(inp)): a packed GEMV's input,
        # with the searched warps of ``site`` at M = 1
        from bitnet158.runtime import kernels

        w, eps = _norm_args(norm)
        warps = self.pack_pick.get(site) if self.pack_pick and self.tiles == "searched" and site and inp.shape[0] == 1 else None
        return kernels.pack_act(inp, k, norm=w, eps=eps, act=act, pdl=self.pdl, warps=warps)

    def _packed_layer(self, i: int, x: torch.Tensor, cos, sin, pos, mask) -> torch.Tensor:
        # the same layer with gemv="packed": a pack_act before each GEMV, whose epilogue adds the residual (eight
        # launches and the attention's): x [B, T, D], B·T ≤ GEMV_MAX_M
        from bitnet158.runtime import kernels

        def packed(site: str, lin: BitLinear, act_in: kernels.PackedAct, residual=None) -> torch.Tensor:
            # lin of a packed input (kernels.PackedAct of M rows) (+ residual), with the searched tile at M = 1
            tile = self.tile_pick[site] if self.tile_pick and self.tiles == "searched" and act_in.xq.shape[0] == 1 else None
            return kernels.bitlinear_gemv_packed(act_in, lin.packed, lin.scale, x.dtype, residual=residual, config=tile, pdl=self.pdl)

        def gemv(site: str, lin: BitLinear, inp: torch.Tensor, norm=None, act=None, residual=None) -> torch.Tensor:
            # lin(norm?(act?(inp))) (+ residual), inp [B·T, K] (gate | up [B·T, 2K] with act)
            return packed(site, lin, self._pack(inp, lin.in_features, norm, act, site), residual)

        layer = self.net.layers[i]
        a, m = layer.attn, layer.mlp
        b, t, d = x.shape
        x2 = x.reshape(b * t, d)
        qkv = gemv("qkv", self.qkv[i], x2, layer.attn_norm).view(b, t, -1)  # [B, T, Nq + 2·Nkv]
        if self.attention == "folded" and self._attention_kernel(qkv, pos):
            # one launch for the attention, its combine and the packing of o's input (the sub-norm): two fewer a layer
            fold = kernels.NextPack(self._counter_block(i)[0], *_norm_args(a.sub_norm))
            h = packed("o", a.o_proj, self._attend(i, qkv, cos, sin, pos, mask, pack_next=fold), residual=x2)
        else:
            y = self._attend(i, qkv, cos, sin, pos, mask)  # [B, T, Nq]
            h = gemv("o", a.o_proj, y.reshape(b * t, -1), a.sub_norm, residual=x2)  # x + o_proj(sub_norm(y))
        gu = gemv("gate_up", self.gate_up[i], h, layer.mlp_norm)  # [B·T, 2·I]
        out = gemv("down", m.down_proj, gu, m.sub_norm, act="relu2" if m.relu2 else "silu", residual=h)  # h + mlp
        return out.view(b, t, d)

    def _folded_layer(self, i: int, x: torch.Tensor, cos, sin, pos, mask, carry):
        # gemv="packed" with each pack_act folded into the kernel that produces its input (kernels.NextPack): the
        # last program of the attention (split, graph step), the o, gate|up and down GEMVs packs the next GEMV's
        # input. Five launches a layer in the graph step: qkv, attention (+ combine + pack), o, gate|up, down.
        # x [B, T, D], B·T ≤ GEMV_MAX_M → ([B, T, D], the next layer's packed input or None)
        from bitnet158.runtime import kernels

        layer = self.net.layers[i]
        a, m = layer.attn, layer.mlp
        b, t, d = x.shape
        x2 = x.reshape(b * t, d)
        pdl = self.pdl
        cnt = self._counter_block(i)  # [4, width]: attention, o, gate|up, down

        def nxt(site: int, norm, act=None) -> kernels.NextPack:
            return kernels.NextPack(cnt[site], *_norm_args(norm), act)

        def gemv(act_in: kernels.PackedAct, lin: BitLinear, residual=None, pack_next=None):
            return kernels.bitlinear_gemv_packed(act_in, lin.packed, lin.scale, x.dtype, residual=residual, pdl=pdl, pack_next=pack_next)

        if carry is None:
            carry = self._pack(x2, d, layer.attn_norm)
        qkv = gemv(carry, self.qkv[i]).view(b, t, -1)  # [B, T, Nq + 2·Nkv]
        nq = a.n_heads * a.head_dim
        if self.attention != "triton" and self._attention_kernel(qkv, pos):
            act_o = self._attend(i, qkv, cos, sin, pos, mask, pack_next=nxt(0, a.sub_norm))
        else:
            y = self._attend(i, qkv, cos, sin, pos, mask).reshape(b * t, nq)
            act_o = self._pack(y, nq, a.sub_norm)
        h, act_gu = gemv(act_o, a.o_proj, residual=x2, pack_next=nxt(1, layer.mlp_norm))  # h = x + attention
        gu, act_d = gemv(act_gu, self.gate_up[i], pack_next=nxt(2, m.sub_norm, "relu2" if m.relu2 else "silu"))
        if i + 1 < len(self.net.layers) and self._packed_gemv(i + 1, x):  # the next layer takes a folded input
            out, carry = gemv(act_d, m.down_proj, residual=h, pack_next=nxt(3, self.net.layers[i + 1].attn_norm))
        else:
            out, carry = gemv(act_d, m.down_proj, residual=h), None
        return out.view(b, t, d), carry

    def _counter_block(self, i: int) -> torch.Tensor:
        # layer i's zeroed int32 counters of the folded kernels [4, max(H + 1, GEMV_MAX_M)], made once per model:
        # each launch leaves its counter at zero, so the same ones serve every step and CUDA graph replay
        from bitnet158.runtime.kernels import GEMV_MAX_M

        if self._counters is None:
            width = max(self.config.num_attention_heads + 1, GEMV_MAX_M)
            self._counters = torch.zeros((len(self.net.layers), 4, width), dtype=torch.int32, device=self.device)
        return self._counters[i]

    def logits_last(self, tokens: torch.Tensor, start_pos: int | torch.Tensor) -> torch.Tensor:
        """fp32 logits [B, V] of the last position of tokens [B, T] run at positions start_pos..."""
        return self.logits(tokens, start_pos)[:, -1]

    @torch.inference_mode()  # the KV cache holds inference tensors
    def logits(self, tokens: torch.Tensor, start_pos: int | torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """fp32 logits [B, T', V] for tokens [B, T] run at positions start_pos.. (T' = 1 with ``last_only``).

        ``start_pos`` int: eager path over the cache prefix (prefill, any T). Tensor [T]: static shapes over the
        whole cache with a mask (the CUDA-graph decode step). Keys/values are written into the network's caches.
        """
        b, t = tokens.shape
        if self.backend == "cpu" and b == 1 and last_only and isinstance(start_pos, int):
            return self._cpu_logits(tokens, start_pos)
        x = self._hidden(tokens, start_pos)  # [B, T, D]
        x = x[:, -1:] if last_only else x  # [B, T', D]: decode only needs the last position
        if self.head == "int8" and self.backend in ("triton", "triton_op"):
            from bitnet158.runtime.kernels import PDL_MODES, head_int8_op

            n = self.net.norm  # the final norm runs inside the head's kernel
            logits = head_int8_op(x.reshape(-1, x.shape[-1]), self.head_q, self.head_scale, n.weight, n.eps,
                                  PDL_MODES.index(self.pdl))  # fmt: skip
            return logits.view(b, x.shape[1], -1)
        x = self._norm(self.net.norm, x)
        if self.head == "bf16":
            return self.net.head_logits(x)
        return int8_head_logits(x.reshape(-1, x.shape[-1]), self.head_q, self.head_scale).view(b, x.shape[1], -1)

    def _hidden(self, tokens: torch.Tensor, start_pos: int | torch.Tensor) -> torch.Tensor:
        # tokens [B, T] → the last layer's output [B, T, D] (before the final norm); see logits()
        net = self.net
        b, t = tokens.shape
        if isinstance(start_pos, int):
            if start_pos + t > net.max_seq or b > net.max_batch:
                raise FastPathError(
                    f"positions up to {start_pos + t} / batch {b} exceed the cache ({net.max_seq} / {net.max_batch})"
                )
            cos, sin = net.cos[start_pos : start_pos + t], net.sin[start_pos : start_pos + t]  # [T, Dh]
            if t == 1:
                mask = None
            else:
                keys = torch.arange(start_pos + t, device=tokens.device)
                mask = keys[None, :] <= (start_pos + torch.arange(t, device=tokens.device))[:, None]  # [T, L]
        elif self._attention_kernel(tokens, start_pos):
            # the attention kernels read the rope rows at the position themselves, and need no mask: no launch here
            cos, sin, mask = net.cos, net.sin, None  # [max_seq, Dh] tables
        else:
            cos, sin = net.cos[start_pos], net.sin[start_pos]
            mask = torch.arange(net.max_seq, device=tokens.device)[None, :] <= start_pos[:, None]  # [T, max_seq]
        x = net.embed_tokens(tokens)  # [B, T, D]
        carry = None  # gemv="folded": the next layer's input, packed by the layer before
        for i in range(len(net.layers)):
            x, carry = self._layer(i, x, cos, sin, start_pos, mask, carry)
        return x

    def _cpu_logits(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """fp32 logits [1, 1, V] of the last of tokens [1, T] on the CPU backend: one token through runtime/cpu.py's
        compiled step, several through ``_hidden`` (prefill), then the compiled head."""
        from bitnet158.runtime import cpu

        net = self.net
        if start_pos + tokens.shape[1] > net.max_seq:
            raise FastPathError(f"positions up to {start_pos + tokens.shape[1]} exceed the cache ({net.max_seq})")
        # one token: the compiled step. A one-token prompt runs it at position 0, which torch.compile compiles apart
        # (it specialises an int of 0); as a prompt, its one-row GEMVs would compile 4 graphs instead
        step = tokens.shape[1] == 1
        try:
            x = self._cpu_step(tokens, start_pos) if step else self._hidden(tokens, start_pos)[0, -1]
            if self.head == "int8":  # the final norm eagerly (one vector), then one int8 GEMV
                out = int8_head_logits(net.norm(x)[None], self.head_q, self.head_scale)[0]
            else:
                out = cpu.kernels().head(x, net.norm.weight, net.norm.eps, net.head)  # [V]
        except Exception as e:
            if self._cpu_compiled:
                raise
            # compiling failed (no working C++ toolchain...); the reference arithmetic rewrites the same cache slots
            log.warning("the compiled CPU path failed (%s: %s); using the reference path", type(e).__name__, e)
            self.set_backend("reference")
            return self.logits(tokens, start_pos)
        self._cpu_compiled = self._cpu_compiled or step  # the layer function (and the bf16 head's) compiled
        return out[None, None]

    def warm_up(self) -> bool:
        """Compile what the first decode steps would (the CPU backend's layer and head) by running one token at
        position 2. True when it ran; False when nothing was left to compile, or with a cache of under 3 positions
        (no decode step at all).

        Position 2: torch.compile specialises an int of 0 (in some versions 1 too) even under
        cpu.symbolic_position(), and would compile again at the next step. The slot it writes is safe: a prompt over
        it rewrites it, and otherwise the decode step at that position writes it before any step reads it."""
        if self.backend != "cpu" or self._cpu_any_pos or self.net.max_seq < 3:
            return False
        self.logits(torch.zeros((1, 1), dtype=torch.long, device=self.device), 2)
        return True

    def _cpu_step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        # one token [1, 1] at position pos → the last layer's output [D]
        from bitnet158.runtime import cpu

        net = self.net
        if self._cpu_weights is None:
            self._cpu_weights = [self._cpu_layer_weights(i) for i in range(len(net.layers))]
        layer_fn = cpu.kernels().layer
        cos, sin = net.cos[pos : pos + 1], net.sin[pos : pos + 1]  # [1, Dh]
        # [D]: a new tensor, not a view of the embedding (under inference mode a view of it is a normal tensor, the
        # layers' outputs are inference tensors, and torch.compile would compile the first layer apart)
        x = net.embed_tokens(tokens[0])[0]
        # the first step at a position >= 2 compiles with pos symbolic: one compile for every position (the setting
        # costs ~0.1 ms a step, so later steps go without it). Until then (a one-token prompt at position 0 compiles
        # a graph for 0 alone) steps keep it: the layer's shapes are static, so a step without it would compile
        # again at every position.
        with cpu.symbolic_position() if not self._cpu_any_pos else contextlib.nullcontext():
            for layer, w in zip(net.layers, self._cpu_weights):
                a = layer.attn
                x = layer_fn(x, cos, sin, pos, a.cache.k, a.cache.v, w, layer.mlp_norm.eps, layer.mlp.relu2,
                             (a.n_heads, a.n_kv, a.head_dim))  # fmt: skip
        self._cpu_any_pos = self._cpu_any_pos or pos >= 2
        return x

    def _cpu_layer_weights(self, i: int):
        from bitnet158.runtime.cpu import LayerWeights

        layer = self.net.layers[i]
        a, m = layer.attn, layer.mlp
        return LayerWeights(
            layer.attn_norm.weight, self.qkv[i].packed, self.qkv[i].scale,
            a.sub_norm.weight if a.sub_norm is not None else None, a.o_proj.packed, a.o_proj.scale,
            layer.mlp_norm.weight, self.gate_up[i].packed, self.gate_up[i].scale,
            m.sub_norm.weight if m.sub_norm is not None else None, m.down_proj.packed, m.down_proj.scale,
        )  # fmt: skip

    def _counter(self, device: torch.device) -> torch.Tensor:
        # the pick kernels' int32 counter: zero, and each launch leaves it zero, so they share one
        if self._pick_counter is None:
            self._pick_counter = torch.zeros((1,), dtype=torch.int32, device=device)
        return self._pick_counter

    def greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """The greedy next id (int64 [1]) of fp32 logits [V], on the device: ``argmax="triton"`` on the triton
        backend runs ``kernels.argmax`` (one launch), else torch's argmax; both give the first maximal index."""
        if self.argmax == "triton" and self.backend == "triton":
            from bitnet158.runtime.kernels import argmax

            return argmax(logits, self._counter(logits.device), pdl=self.pdl)
        return logits.argmax(-1, keepdim=True)

    def sample(
        self, logits: torch.Tensor, temperature: torch.Tensor, top_k: int | None, top_p: torch.Tensor | None,
        min_p: torch.Tensor | None, rng: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """A sampled next id (int64 [1]) of fp32 logits [V] on the device, as ``sample_on_device`` (whose
        arguments these are): ``argmax="triton"`` on the triton backend, with no top-k or 1 ≤ top_k ≤
        kernels.SAMPLE_MAX_K, runs ``kernels.sample`` (one launch with a top-k, a radix select of the top-p cut
        without; it draws from the stream ``rng``, int64 [2]); else torch's ops draw from torch's generator. The
        filters are the same; the random numbers differ."""
        if self.argmax == "triton" and self.backend == "triton":
            from bitnet158.runtime import kernels

            if not top_k or top_k <= kernels.SAMPLE_MAX_K:
                return kernels.sample(logits, temperature, top_k or None, top_p, min_p, rng, self._counter(logits.device),
                                      pdl=self.pdl)[:1]  # fmt: skip
        return sample_on_device(logits, temperature, top_k, top_p, min_p)


def penalize_on_device(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """runtime/sampling.py's apply_repetition_penalty over a mask instead of a list of ids: fp32 logits [V], seen
    bool [V] (the ids in the context), penalty f32 [1] (a tensor, so that one CUDA graph serves every value)."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def sample_on_device(
    logits: torch.Tensor, temperature: torch.Tensor | None, top_k: int | None, top_p: torch.Tensor | None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Next id (int64 [1]) from fp32 logits [V] with no host sync: greedy when ``temperature`` is None, else an
    exponential race argmax(p / E), E ~ Exp(1), which draws from p (what torch.multinomial draws, without
    its host-side checks). ``top_k`` int, ``top_p`` and ``min_p`` tensors [1] filter as runtime/sampling.py does."""
    if temperature is None:
        return logits.argmax(-1, keepdim=True)
    logits = filter_logits(logits / temperature, top_k, top_p, min_p)
    probs = logits.softmax(-1)
    race = probs / torch.empty_like(probs).exponential_(1.0)
    return race.argmax(-1, keepdim=True)


def _tile_cache_file() -> str:
    from bitnet158.runtime.cpu import cache_home

    return os.path.join(cache_home(), "gemv_tiles.json")


def _tile_cache() -> dict:
    """GraphDecoder.search_tiles' earlier picks by key; {} when there are none or the file is unreadable."""
    try:
        with open(_tile_cache_file(), encoding="utf-8") as f:
            out = json.load(f)
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def _valid_pick(known, configs: list, pack_warps: tuple, pack_sites: list, pos: int) -> bool:
    # a cache entry as _keep_tiles writes it, its tiles and warps among those searched, ints only (16.0 == 16 would
    # pass the membership tests, then fail as a launch's block size), searched at position ``pos`` or past it:
    # anything else, from a smaller cache's search or a damaged or hand-edited file, means a new search
    def ints(v) -> bool:
        return isinstance(v, list) and all(type(x) is int for x in v)

    return isinstance(known, dict) and isinstance(known.get("pack"), dict) and \
        all(ints(known.get(s)) and tuple(known[s]) in configs for s in SITES) and \
        all(type(known["pack"].get(s)) is int and known["pack"][s] in pack_warps for s in pack_sites) and \
        type(known.get("pos")) is int and known["pos"] >= pos  # fmt: skip


def _keep_tiles(key: str, pick: dict) -> None:
    # add a pick to the cache file: written beside it, then renamed over it; a cache that cannot be written is
    # only a cache, so nothing is raised
    path = _tile_cache_file()
    picks = _tile_cache()
    picks[key] = {s: list(c) if isinstance(c, tuple) else c for s, c in pick.items()}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    except OSError as e:
        log.info("could not keep the searched tiles in %s: %s", path, e)
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(picks, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        log.info("could not keep the searched tiles in %s: %s", path, e)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _common_prefix(a: Sequence[int], b: Sequence[int], most: int) -> int:
    """How many leading ids a and b share, at most ``most``."""
    n = 0
    for x, y in zip(a[:most], b[:most]):
        if x != y:
            break
        n += 1
    return n


class GraphDecoder:
    """Batch-1 generation: eager prefill, then decode steps replayed from CUDA graphs (one per sampling mode).

    The KV cache is allocated once for ``max_seq`` positions; prompt + new tokens must fit. ``use_graph=False``
    runs the same step eagerly (for A/B timing and for the CPU).
    """

    def __init__(self, fast: FastModel, max_seq: int, *, use_graph: bool = True, compile: bool = False, chunk: int = 32):
        self.fast = fast
        net = fast.net
        net.setup_cache(1, max_seq)
        self.max_seq = net.max_seq
        dev = net.device
        if use_graph and dev.type != "cuda":
            raise FastPathError("CUDA graphs need a CUDA device; use use_graph=False on the CPU")
        self.use_graph = use_graph
        self.chunk = chunk
        self._tok = torch.zeros((1, 1), dtype=torch.long, device=dev)  # the token to run next
        self._pos = torch.zeros((1,), dtype=torch.long, device=dev)  # its position
        self._host_pos = 0  # the same, on the host (the step without a graph)
        self._n = torch.zeros((1,), dtype=torch.long, device=dev)  # how many ids are in _out
        self._out = torch.zeros((self.max_seq,), dtype=torch.long, device=dev)  # generated ids, in order
        self._temp = torch.ones((1,), dtype=torch.float32, device=dev)
        self._top_p = torch.ones((1,), dtype=torch.float32, device=dev)
        self._min_p = torch.zeros((1,), dtype=torch.float32, device=dev)
        self._penalty = torch.ones((1,), dtype=torch.float32, device=dev)  # the repetition penalty
        self._seen = torch.zeros((net.head.shape[0],), dtype=torch.bool, device=dev)  # ids in the context
        self._rng = torch.zeros((2,), dtype=torch.long, device=dev)  # kernels.sample's stream: (seed, draws)
        self._state = (self._tok, self._pos, self._n, self._out, self._seen, self._rng)  # what a step changes
        self._logits_fn = fast.logits_last
        if compile:
            self._logits_fn = torch.compile(fast.logits_last, dynamic=False)
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        # what the cache holds after the last generation (context()): its prompt, then _fed ids of _out
        self._ctx_prompt: list[int] = []
        self._ctx_fed = 0
        self._writes = 0  # forget() calls: a generation records its context only if none came after its start

    def context(self) -> list[int]:
        """The ids whose keys and values the cache holds at positions 0.. after the last clean generation: its
        prompt and the generated ids that decode steps ran (also past a stop id, up to the device's run-ahead).
        ``generate(reuse=True)`` skips the longest prefix of a new prompt that this holds."""
        return self._ctx_prompt + self._out[: self._ctx_fed].tolist()

    def adopt(self, ids: list[int]) -> None:
        """Declare that the cache holds ``ids`` at positions 0.. (a bigger decoder over the same, grown cache).
        The step state moves past them: a graph capture's eager steps write the slot at that position."""
        self._ctx_prompt, self._ctx_fed = list(ids), 0
        self._pos.fill_(len(ids))
        self._host_pos = len(ids)

    def forget(self) -> None:
        """Something else wrote into the cache (a full forward, a perplexity run): reuse nothing of it."""
        self._ctx_prompt, self._ctx_fed = [], 0
        self._writes += 1

    @staticmethod
    def sampling_key(
        temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
        repetition_penalty: float = 1.0,
    ) -> tuple:  # fmt: skip
        """The sampling mode of these options, (greedy, top_k, top-p on, min-p on, penalty on): each mode is its
        own step (and CUDA graph); the values themselves live in device buffers, so they need no new capture."""
        greedy = temperature == 0
        return (greedy, None if greedy else (top_k or None), not greedy and top_p is not None and top_p < 1.0,
                not greedy and bool(min_p), repetition_penalty != 1.0)  # fmt: skip

    def _step(self, key: tuple) -> None:
        # one decode step on the static buffers; everything stays on the device. Without a graph the position
        # goes in as a Python int, so attention reads only the filled part of the cache.
        logits = self._logits_fn(self._tok, self._pos if self.use_graph else self._host_pos)[0]  # [V]
        self._host_pos += 1
        nxt = self._pick(logits, key)
        if self.fast.backend == "triton":  # one launch (in the graph: one node, with PDL) for the four ops below
            from bitnet158.runtime.kernels import advance

            advance(nxt, self._out, self._n, self._tok, self._pos, pdl=self.fast.pdl)
            return
        self._out.index_copy_(0, self._n, nxt)
        self._tok.copy_(nxt.view(1, 1))
        self._pos.add_(1)
        self._n.add_(1)

    def _pick(self, logits: torch.Tensor, key: tuple) -> torch.Tensor:
        # the next id (int64 [1]) from fp32 logits [V] by sampling mode key, on the device; with the repetition
        # penalty, the id joins the ids seen
        greedy, top_k, use_top_p, use_min_p, use_penalty = key
        if self.fast.backend == "cpu":  # as the Sampler checks; on CUDA it would be a host sync a token, in a graph
            check_finite(logits)
        if use_penalty:
            logits = penalize_on_device(logits, self._seen, self._penalty)
        if greedy:
            nxt = self.fast.greedy(logits)
        else:
            nxt = self.fast.sample(logits, self._temp, top_k, self._top_p if use_top_p else None,
                                   self._min_p if use_min_p else None, self._rng)  # fmt: skip
        if use_penalty:
            self._seen.index_fill_(0, nxt, True)
        return nxt

    def _replay(self, key: tuple) -> None:
        if not self.use_graph:
            self._step(key)
            return
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(key)
        graph.replay()

    def warm_up(self, key: tuple) -> bool:
        """Compile what the decode steps of sampling mode ``key`` need, before a generation times or seeds
        anything: the CPU backend's step (FastModel.warm_up) or, with graphs, the graph of ``key`` (_capture: its
        eager steps compile and autotune the Triton kernels). True when anything ran.

        Capturing later, inside the first generation, would also draw that generation's random numbers for those
        eager steps, after the seed: its sampled ids would differ from a second generation's with the same seed."""
        ran = self.fast.warm_up()
        if ran:
            self.forget()  # its step wrote position 2 of the cache, which a held context may cover
        if self.use_graph and key not in self._graphs:
            self._capture(key)
            ran = True
        return ran

    def _capture(self, key: tuple) -> torch.cuda.CUDAGraph:
        if self.fast.tiles == "searched":
            try:
                self.search_tiles(key)
            except Exception as e:  # e.g. a tile another GPU cannot compile: the autotuner skips those, a search not
                log.warning("the decode step's tile search failed (%s: %s); using autotuned tiles", type(e).__name__, e)
                self.fast.tiles = "autotune"
        graph = self._graphs[key] = self._record(key, 3)
        log.info("captured a decode graph for sampling mode %s", key)
        return graph

    def _record(self, key: tuple, warm: int) -> torch.cuda.CUDAGraph:
        # A CUDA graph of one decode step of mode ``key``. ``warm`` eager steps first, on a side stream (autotuning,
        # compilation, lazy init), then the capture. The warm-up steps write the k/v slot at the current position,
        # which the prefill or the decode step there rewrites before anything reads it; the state buffers are
        # restored after each step, so the decoder does not move.
        saved = [b.clone() for b in self._state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warm):
                self._restore(saved)
                self._step(key)
        torch.cuda.current_stream().wait_stream(side)
        self._restore(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(key)
        self._restore(saved)  # capture does not run the step, but keep the state exact whatever the backend did
        return graph

    def _restore(self, saved: list[torch.Tensor]) -> None:
        # the step state buffers back to ``saved`` (clones of self._state)
        for b, s in zip(self._state, saved):
            b.copy_(s)

    def _time_step(self, key: tuple, reps: int) -> float:
        # µs of one replay of a freshly recorded step graph, median of ``reps``, the state restored before each
        graph = self._record(key, 1)
        saved = [b.clone() for b in self._state]
        times = []
        for _ in range(reps):
            self._restore(saved)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            graph.replay()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) * 1e3)
        self._restore(saved)
        return sorted(times)[len(times) // 2]

    def _tile_cache_key(self, configs: list, pack_warps: tuple) -> str:
        # what the search's pick depends on: the device and its software, the step's variant and the matrices
        import triton

        fast = self.fast
        dev = fast.device
        shapes = ",".join(f"{lin.out_features}x{lin.in_features}" for lin in fast.site_linears(0))
        return " | ".join([torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type, f"torch {torch.__version__}",
                           f"triton {triton.__version__}", str(fast.net.dtype), f"attention {fast.attention}", f"pdl {fast.pdl}",
                           f"head {fast.head}", f"prefetch {fast.prefetch}", f"{len(fast.net.layers)} layers {shapes}",
                           str(configs), f"pack warps {list(pack_warps)}"])  # fmt: skip

    @torch.inference_mode()
    def search_tiles(self, key: tuple | None = None, configs: list | None = None, reps: int = 10, cached: bool = True,
                     pack_warps: Sequence[int] | None = None):  # fmt: skip
        """Choose the packed GEMV tile (kernels.PACKED_GEMV_CONFIGS, or ``configs``) of each of the graph step's
        four sites, q/k/v, o, gate|up and down, then the warps of the pack_act before each (kernels.PACK_WARPS,
        or ``pack_warps``), by timing the decode step itself (sampling mode ``key``, default greedy): site by site,
        every tile, the other sites at their current pick (kernels.FIXED_GEMV at first), then site by site every
        warp count (pack_act_launch's at first), each a graph of the step replayed ``reps`` times at position
        SEARCH_POS (or past the context). Returns the tile pick, kept in ``fast.tile_pick`` for every later capture
        (µs a step in ``fast.tile_times``), and the warps in ``fast.pack_pick`` (``fast.pack_times``); None where
        it does not apply: gemv other than "packed", no CUDA graph, or BITNET158_AUTOTUNE=0 without ``configs``.
        A cache of SEARCH_POS slots or fewer times the step at its last slot, which costs less attention.

        Why the whole step: Triton's autotuner times one GEMV alone, again and again, and tiles that tie there
        do not tie in the step, where with PDL a GEMV launches while the kernel before it runs and fetches what
        its tile lets it before its wait. On an H200 the searched tiles ran the decode 4 % faster than the
        autotuned ones in the same process (benchmarks/RESULTS.md). 96 timed steps at the 2B-4T shape, and 12
        for the packs (9 with the folded attention, which packs o's input itself). A pack's warps can change the
        last bit of its norm's sum of squares (kernels.pack_act), so the pick can move a rounding.

        The pick is kept in $XDG_CACHE_HOME/bitnet158/gemv_tiles.json (``cached``: read it first), keyed by the
        GPU, torch, Triton, the step's variant and the matrix shapes, so that later runs skip the search, with the
        position it was timed at: a run that can time at a later one (a bigger cache) searches again and replaces
        it, so a short run's pick does not stand for the long ones (the tiles' overlap with the attention, which
        grows with the position, is what the search weighs)."""
        from bitnet158.runtime import kernels

        fast = self.fast
        if fast.tile_pick is not None:
            return fast.tile_pick
        if not self.use_graph or fast.backend != "triton" or fast.gemv != "packed" or not any(fast._fusable_layers()):
            return None
        if configs is None and not kernels.autotuning():
            return None
        configs = [tuple(c) for c in configs or kernels.PACKED_GEMV_CONFIGS]
        pack_warps = tuple(pack_warps or kernels.PACK_WARPS)
        # the sites whose input a pack_act launch packs (the folded attention packs o's)
        pack_sites = [s for s in SITES if not (s == "o" and fast.attention == "folded")]
        cache_key = self._tile_cache_key(configs, pack_warps)
        pos = self._pos.clone()
        # past the context, so that the steps' k/v writes land where nothing is read before it is rewritten
        at = max(int(pos), min(self.max_seq - 1, SEARCH_POS))
        known = _tile_cache().get(cache_key) if cached else None
        if _valid_pick(known, configs, pack_warps, pack_sites, min(at, SEARCH_POS)):
            fast.tile_pick, fast.tile_times = {s: tuple(known[s]) for s in SITES}, {}
            fast.pack_pick, fast.pack_times = {s: known["pack"][s] for s in pack_sites}, {}
            return fast.tile_pick
        key = key or self.sampling_key()
        t0 = time.perf_counter()
        self._pos.fill_(at)
        pick = dict.fromkeys(SITES, kernels.FIXED_GEMV if kernels.FIXED_GEMV in configs else configs[0])
        times: dict[str, dict] = {s: {} for s in SITES}
        packs: dict[str, int] = {}  # no entry: pack_act_launch's warps
        pack_times: dict[str, dict] = {s: {} for s in pack_sites}
        fast.tile_pick, fast.pack_pick = pick, packs
        try:
            for site in SITES:
                for cfg in configs:
                    pick[site] = cfg
                    times[site][cfg] = self._time_step(key, reps)
                pick[site] = min(times[site], key=times[site].get)
            for site in pack_sites:
                for w in pack_warps:
                    packs[site] = w
                    pack_times[site][w] = self._time_step(key, reps)
                packs[site] = min(pack_times[site], key=pack_times[site].get)
        except BaseException:
            fast.tile_pick = fast.pack_pick = None
            raise
        finally:
            self._pos.copy_(pos)
        fast.tile_times, fast.pack_times = times, pack_times
        last = pack_times[pack_sites[-1]][packs[pack_sites[-1]]] if pack_sites else times[SITES[-1]][pick[SITES[-1]]]
        log.info("packed GEMV tiles searched in %.1f s: %s; pack warps %s (%.0f µs a step)", time.perf_counter() - t0,
                 ", ".join(f"{s} {pick[s]}" for s in SITES), packs, last)  # fmt: skip
        _keep_tiles(cache_key, {**pick, "pack": packs, "pos": min(at, SEARCH_POS)})
        return pick

    @torch.inference_mode()
    def prefill(self, prompt_ids: Sequence[int], start: int = 0) -> torch.Tensor:
        """Run prompt_ids[start:] at positions start..; fp32 logits [V] of the last token. The cache must already
        hold the keys and values of the first ``start`` ids."""
        tokens = torch.tensor([list(prompt_ids[start:])], dtype=torch.long, device=self.fast.device)
        return self.fast.logits_last(tokens, start)[0]

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_ids: Sequence[int] = (),
        stats: GenerationStats | None = None,
        reuse: bool = False,
        min_p: float | None = None,
    ) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` ids after the prompt, stopping before any of ``stop_ids``.

        ``reuse``: run only what follows the longest prefix of the prompt that the cache holds from the last
        generation (``context()``; at least the last prompt token runs), as a chat's next turn does. Those keys
        and values came partly from decode steps, so the logits may differ from a fresh prefill's by float
        rounding; without ``reuse`` the whole prompt runs and equal calls give equal ids.

        Sampling as runtime/sampling.py's Sampler (repetition penalty over the prompt and the generated ids, then
        temperature, top-k, top-p, min-p), on the device (FastModel.sample): the random draw differs, the rest is
        the same. ``seed`` seeds torch's generator, and the sampling kernel's stream through it.

        The device runs ahead by up to ``chunk`` steps between host reads; ids past a stop are discarded.
        ``stats`` is filled as ``generate_tokens`` fills it (decode time includes the discarded run-ahead steps).
        """
        n_prompt = len(prompt_ids)
        if n_prompt == 0 or max_new_tokens < 1:
            raise FastPathError("generate: need a non-empty prompt and max_new_tokens >= 1")
        if n_prompt + max_new_tokens > self.max_seq:
            raise FastPathError(f"prompt {n_prompt} + {max_new_tokens} new tokens exceed the decoder's max_seq {self.max_seq}")
        try:
            # the Sampler path's checks
            SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           repetition_penalty=repetition_penalty, seed=seed)  # fmt: skip
        except SamplingError as e:
            raise FastPathError(f"bad sampling options: {e}") from None
        key = self.sampling_key(temperature, top_k, top_p, min_p, repetition_penalty)  # one graph each
        greedy, _, use_top_p, use_min_p, use_penalty = key
        if not greedy:
            self._temp.fill_(temperature)
            self._top_p.fill_(top_p if use_top_p else 1.0)
            self._min_p.fill_(min_p if use_min_p else 0.0)
        if use_penalty:  # the prompt's ids; each step adds its own (the warm-up's capture restores the mask)
            self._penalty.fill_(repetition_penalty)
            self._seen.zero_()
            self._seen.index_fill_(0, torch.tensor(list(prompt_ids), device=self._seen.device), True)
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = n_prompt
        t0 = time.perf_counter()
        if self.warm_up(key):  # compiling is neither prefill nor decode: timed apart
            _sync(self.fast.device)
            stats.warmup_s = time.perf_counter() - t0
        # after the warm-up: a capture's steps write only the slot past the context (the state's position), and
        # the CPU step, which writes inside it, makes the decoder forget it
        start = _common_prefix(self.context(), prompt_ids, n_prompt - 1) if reuse else 0
        self.forget()  # the cache is being rewritten; set again when this generation ends cleanly
        writes = self._writes
        stats.cached_tokens = start
        if seed is not None:  # after the warm-up, whose steps draw random numbers too
            torch.manual_seed(seed)  # seeds the CUDA generator too, which graph replays draw from
        if not greedy:  # kernels.sample's stream: a seed from torch's generator (so from ``seed``), draw 0
            self._rng.copy_(torch.tensor([int(torch.randint(0, 2**32, ())), 0]))
        t0 = time.perf_counter()
        first = self._pick(self.prefill(prompt_ids, start), key)
        self._tok.copy_(first.view(1, 1))
        self._pos.fill_(n_prompt)
        self._host_pos = n_prompt
        self._out[0:1].copy_(first)
        self._n.fill_(1)
        _sync(self.fast.device)  # the prefill time must include the device work, as in generate_tokens
        stats.prefill_s = time.perf_counter() - t0
        stats.stop_reason = "length"
        t1 = time.perf_counter()
        stops = set(stop_ids)
        done = 0  # ids already yielded
        made = 1  # ids the device has produced; steps have run (fed) the first made - 1 of them
        try:
            while done < max_new_tokens:
                steps = min(self.chunk, max_new_tokens - made)
                for _ in range(steps):
                    self._replay(key)
                made += steps
                for tok in self._out[done:made].tolist():  # the one host sync per chunk
                    if tok in stops:
                        stats.stop_reason = "eos"
                        return
                    done += 1
                    stats.generated_tokens += 1
                    stats.token_ids.append(tok)
                    yield tok
        finally:
            _sync(self.fast.device)
            stats.decode_s = time.perf_counter() - t1
            stats.decode_steps = made - 1
            if self._writes == writes:  # not when closed after a later generation or forward rewrote the cache
                self._ctx_prompt, self._ctx_fed = list(prompt_ids), made - 1
