"""The Triton kernels and the fast path against the pure-torch reference.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before anything
imports Triton). Integer results must match exactly; float outputs are compared bit for bit where the arithmetic is the
same (fp32 outputs), and to one bf16 ulp for bf16 outputs in the interpreter (its fp32 → bf16 cast truncates
where the GPU rounds to nearest even). Tests marked ``gpu`` run the compiled kernels on a CUDA device.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import logging
import math
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import patch

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()  # without CUDA the kernels run in the interpreter (tests/conftest.py)
triton = pytest.importorskip("triton")
tl = triton.language  # for the test kernels; the interpreter also looks for it in programs_at_once's launcher

from bitnet158.formats.ternary import pack_t2, unpack_t2
from bitnet158.runtime import kernels
from bitnet158.runtime.bitlinear import BitLinear, int8_head_logits, quantize_activations, quantize_head
from bitnet158.runtime.generate import GenerationStats

interp = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run where there is no CUDA device")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DEV = "cuda" if HAS_CUDA else "cpu"
ROOT = Path(__file__).resolve().parents[1]


# --- reference ------------------------------------------------------------------------------------------------
def ref_int(x: torch.Tensor, packed: torch.Tensor, K: int):
    """(Σ t·q [M, N] as float64, exact: |Σ| < 2^53; s f32 [M, 1]) from the torch quantizer and unpack_t2."""
    q, s = quantize_activations(x)
    t = unpack_t2(packed, K).double()
    return q.double() @ t.T, s


def ref_y(x, packed, scale, K):
    acc, s = ref_int(x, packed, K)
    return (acc.float() * scale / s).to(x.dtype)


def rand_case(M, N, K, *, per_row: bool, dtype=torch.float32, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, (N, K), generator=g)
    packed = pack_t2(t)
    scale = torch.rand(N if per_row else 1, generator=g) + 0.5
    x = torch.randn(M, K, generator=g) * 3
    x[0, K // 2] = 40.0  # one outlier per first row: most q small, like real activations
    return x.to(device, dtype), packed.to(device), scale.to(device)


def assert_out(y, ref):
    assert y.dtype == ref.dtype and y.shape == ref.shape
    y, ref = y.cpu(), ref.cpu()
    if y.dtype == torch.float32 or HAS_CUDA:
        assert torch.equal(y, ref), f"max diff {(y.float() - ref.float()).abs().max()}"
    else:
        ulp = ref.float().abs().clamp(min=1e-30) * 2.0**-7  # one bf16 ulp (bound)
        assert bool(((y.float() - ref.float()).abs() <= ulp).all())


# --- activation quantization ----------------------------------------------------------------------------------
@interp
@pytest.mark.parametrize("M,K,dtype", [(1, 7, torch.float32), (3, 300, torch.bfloat16), (17, 130, torch.float32)])
def test_quantize_act_exact(M, K, dtype):
    x = (torch.randn(M, K) * 5).to(dtype)
    q, s = kernels.quantize_act(x)
    qr, sr = quantize_activations(x)
    assert q.dtype == torch.int8 and torch.equal(q, qr)
    assert torch.equal(s, sr[:, 0])


@interp
def test_quantize_act_rounds_half_to_even():
    # max 127 → s = 127 · (1/127); x · s then lands on exact halves for these values when s == 1
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 126.5, -128.0]])
    q, s = kernels.quantize_act(x)
    qr, sr = quantize_activations(x)
    assert torch.equal(q, qr) and torch.equal(s, sr[:, 0])
    if float(s) == 1.0:
        assert q[0, 1:8].tolist() == [0, 2, 2, 0, -2, -2, 3]


# --- decode GEMV ----------------------------------------------------------------------------------------------
GEMV_CASES = [(1, 37, 320), (1, 5, 301), (3, 33, 64), (2, 16, 1040), (4, 9, 16)]


@interp
@pytest.mark.parametrize("M,N,K", GEMV_CASES)
@pytest.mark.parametrize("per_row", [False, True])
def test_gemv_exact(M, N, K, per_row):
    x, packed, scale = rand_case(M, N, K, per_row=per_row, seed=M * 1000 + N + K)
    assert kernels.gemv_compatible(packed)
    y = kernels.bitlinear_gemv(x, packed, scale, K)
    assert_out(y, ref_y(x, packed, scale, K))


@interp
def test_gemv_bf16_input_and_strided_x():
    x, packed, scale = rand_case(2, 21, 320, per_row=True, dtype=torch.bfloat16, seed=3)
    wide = torch.zeros(2, 400, dtype=torch.bfloat16)
    wide[:, :320] = x
    y = kernels.bitlinear_gemv(wide[:, :320], packed, scale, 320)  # row stride 400
    assert_out(y, ref_y(x, packed, scale, 320))


@interp
def test_gemv_refuses_rows_not_whole_words():
    x, packed, scale = rand_case(1, 4, 290, per_row=False)  # 73 bytes per row
    assert not kernels.gemv_compatible(packed)
    with pytest.raises(kernels.KernelShapeError):
        kernels.bitlinear_gemv(x, packed, scale, 290)
    assert_out(kernels.bitlinear_triton(x, packed, scale, 290), ref_y(x, packed, scale, 290))


# --- packed decode GEMV: the input's norm / act·up quantized and packed once (pack_act), the residual in its epilogue
def _layer_case(M, N, K, dtype, seed):
    x, packed, scale = rand_case(M, N, K, per_row=seed % 2 == 1, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    w = (1 + 0.1 * torch.randn(K, generator=g)).to(DEV, dtype)
    gu = (torch.randn(M, 2 * K, generator=g) * 2).to(DEV, dtype)
    res = torch.randn(M, N, generator=g).to(DEV, dtype)
    return x, packed, scale, w, gu, res


# (M, N, K, seed, dtype): K = 528 in fp32 only, to keep the interpreter's time down; K = 13: one padded word
LAYER_CASES = [(1, 37, 160, 0, torch.float32), (1, 37, 160, 0, torch.bfloat16), (2, 21, 528, 1, torch.float32),
               (2, 5, 13, 2, torch.bfloat16)]  # fmt: skip


@interp
@pytest.mark.parametrize("M,N,K,seed,dtype", LAYER_CASES)
def test_packed_gemv_equals_the_separate_kernels(M, N, K, seed, dtype):
    # pack_act + bitlinear_gemv_packed (+ its residual) compute what the separate kernels compute: rmsnorm or
    # act_mul_norm, then the plain GEMV (which quantizes in its loop), then torch's add. Bit for bit without a
    # norm; with one, the sum of squares is reduced in another order (pack_act holds the whole row), which may
    # move a rounding tie of the quantization: then at most a q step or two on an output. The residual: torch's
    # bf16 add rounds to nearest, the interpreter's cast truncates, so one bf16 ulp
    x, packed, scale, w, gu, res = _layer_case(M, N, K, dtype, seed)
    options = {
        "plain": ({}, x, x),
        "norm": (dict(norm=w, eps=1e-5), x, kernels.rmsnorm(x, w, 1e-5)),
        "relu2 + norm": (dict(act="relu2", norm=w, eps=1e-5), gu, kernels.act_mul_norm(gu, w, 1e-5, relu2=True)),
        "silu": (dict(act="silu"), gu, kernels.act_mul_norm(gu, None, 0.0, relu2=False)),
    }
    for name, (kw, inp, separate) in options.items():
        a = kernels.pack_act(inp, K, **kw)
        assert a.xq.shape == (M, 4, (K + 15) // 16) and a.xq.dtype == torch.int32
        for r in (None, res):
            got = kernels.bitlinear_gemv_packed(a, packed, scale, dtype, residual=r)
            want = kernels.bitlinear_gemv(separate, packed, scale, K)
            want = want if r is None else r + want
            assert got.dtype == dtype and got.shape == (M, N), name
            if "norm" in kw:
                step = (scale.max() / a.s)[:, None]  # one q step on one input, in output units
                assert bool(((got.float() - want.float()).abs() <= 2 * step + want.float().abs() * 2**-7).all()), name
            elif r is None or dtype == torch.float32:
                assert torch.equal(got, want), (name, r is not None)
            else:
                assert_out(got, want)
    if dtype == torch.float32:  # and against the torch modules (RMSNorm, BitLinear's quantizer, unpack_t2)
        from bitnet158.runtime.model import RMSNorm

        want = ref_y(RMSNorm(w, 1e-5)(x), packed, scale, K)
        got = kernels.bitlinear_gemv_packed(kernels.pack_act(x, K, norm=w, eps=1e-5), packed, scale, dtype)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # the packed words themselves: word (k, c) holds q[16c + 4i + k] in byte i; qsum = Σ q
    q, s = quantize_activations(x)
    a = kernels.pack_act(x, K)
    qp = torch.nn.functional.pad(q.long(), (0, 16 * a.xq.shape[2] - K)).view(M, -1, 4, 4)  # [M, c, i, k]
    words = ((qp & 0xFF) << (8 * torch.arange(4)[:, None])).sum(2).transpose(1, 2)  # [M, k, c]
    assert torch.equal(a.xq.long() & 0xFFFFFFFF, words & 0xFFFFFFFF)
    assert torch.equal(a.s, s[:, 0]) and torch.equal(a.qsum.long(), q.long().sum(1))


@interp
def test_packed_gemv_refuses_bad_operands():
    x, packed, scale, w, gu, res = _layer_case(1, 37, 160, torch.float32, 0)
    bad = {
        "act": dict(act="gelu"),
        "gate|up width": dict(act="relu2"),  # x is [1, K], not [1, 2K]
        "norm shape": dict(norm=w[:-1]),
    }
    for name, kw in bad.items():
        with pytest.raises(kernels.KernelShapeError):
            kernels.pack_act(x, 160, **kw)
            pytest.fail(name)
    for warps in (3, 0, 64, 4.0):
        with pytest.raises(kernels.KernelShapeError, match="warps must be a power of two"):
            kernels.pack_act(x, 160, warps=warps)
    a = kernels.pack_act(x, 160)
    assert _same_pack(a, kernels.pack_act(x, 160, warps=16))  # the interpreter has no warps: the same pack
    for name, call in {
        "residual shape": lambda: kernels.bitlinear_gemv_packed(a, packed, scale, x.dtype, residual=res[:, :-1]),
        "residual dtype": lambda: kernels.bitlinear_gemv_packed(a, packed, scale, x.dtype, residual=res.double()),
        "weights of another K": lambda: kernels.bitlinear_gemv_packed(a, packed[:, :-4], scale, x.dtype),
    }.items():
        with pytest.raises(kernels.KernelShapeError):
            call()
            pytest.fail(name)
    wq, ws = quantize_head(torch.randn(9, 160))
    with pytest.raises(kernels.KernelShapeError):
        kernels.head_int8(x, wq, ws, norm=w[:-1])


@interp
def test_head_int8_with_the_final_norm():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(2, 160, generator=g), 1 + 0.1 * torch.randn(160, generator=g)
    wq, ws = quantize_head(torch.randn(37, 160, generator=g))
    want = kernels.head_int8(kernels.rmsnorm(x, w, 1e-5), wq, ws)
    assert torch.equal(kernels.head_int8(x, wq, ws, config=(16, 64, 1), norm=w, eps=1e-5), want)  # one block
    assert torch.equal(kernels.head_int8_op(x, wq, ws, w, 1e-5), kernels.head_int8(x, wq, ws, norm=w, eps=1e-5))


def _same_pack(got: kernels.PackedAct, want: kernels.PackedAct) -> bool:
    return got.K == want.K and all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))


@interp
@pytest.mark.parametrize("M,N,K,seed,dtype", [(1, 48, 160, 0, torch.float32), (3, 40, 64, 1, torch.bfloat16),
                                              (2, 98, 48, 2, torch.float32)])  # fmt: skip
def test_folded_gemv_packs_what_pack_act_packs(M, N, K, seed, dtype):
    # pack_next: the GEMV's last program per row packs y for the next GEMV: the same y, and bit for bit the
    # PackedAct that pack_act makes of it (the same _pack_row code), for each option; the counter ends at zero,
    # so the next launch (a graph replay) reuses it. The fixed interpreter tile gives 3 to 7 programs a row.
    x, packed, scale, _, _, res = _layer_case(M, N, K, dtype, seed)
    a = kernels.pack_act(x, K)
    g = torch.Generator().manual_seed(seed)
    w_full, w_half = ((1 + 0.1 * torch.randn(n, generator=g)).to(DEV, dtype) for n in (N, N // 2))
    counter = torch.zeros(8, dtype=torch.int32, device=DEV)
    options = [{}, dict(norm=w_full, eps=1e-5), dict(act="relu2", norm=w_half, eps=1e-6), dict(act="silu")]
    for kw in options:
        for r in (None, res):
            y, nxt = kernels.bitlinear_gemv_packed(a, packed, scale, dtype, residual=r, pack_next=kernels.NextPack(counter, **kw))
            assert torch.equal(y, kernels.bitlinear_gemv_packed(a, packed, scale, dtype, residual=r)), kw
            assert _same_pack(nxt, kernels.pack_act(y, N // 2 if "act" in kw else N, **kw)), kw
            assert not counter.any()
    bad = {
        "counter dtype": kernels.NextPack(counter.long()),
        "counter too short": kernels.NextPack(counter[: M - 1]),
        "norm shape": kernels.NextPack(counter, norm=w_half),
        "act": kernels.NextPack(counter, act="gelu"),
    }
    for name, nxt in bad.items():
        with pytest.raises(kernels.KernelShapeError):
            kernels.bitlinear_gemv_packed(a, packed, scale, dtype, pack_next=nxt)
            pytest.fail(name)
    with pytest.raises(kernels.KernelShapeError, match="gate"):  # act needs an even N (gate | up)
        kernels.bitlinear_gemv_packed(a, packed[:-1], scale[:-1] if scale.numel() > 1 else scale, dtype,
                                      pack_next=kernels.NextPack(counter, act="relu2"))  # fmt: skip


@interp
@pytest.mark.parametrize("pos", [0, 23, 65])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_attention_combines_and_packs(pos, dtype):
    # pack_next: one launch runs the splits, each head's combine (its last split) and the packing of y with the
    # sub-norm (the last head): the same y, cache and PackedAct as split attention + combine + pack_act
    heads, kv, dh = 6, 2, 12
    case = _attention_case(dtype, heads, kv, dh, 70, pos, seed=pos)
    caches = case[4].clone(), case[5].clone()
    want = kernels.decode_attention(*case, heads, kv, dh, split=True)
    w = (1 + 0.1 * torch.randn(heads * dh, generator=torch.Generator().manual_seed(pos))).to(DEV, dtype)
    counter = torch.zeros(heads + 1, dtype=torch.int32, device=DEV)
    for norm in (w, None):
        y, nxt = kernels.decode_attention(*case[:4], *caches, heads, kv, dh, split=True,
                                          pack_next=kernels.NextPack(counter, norm, 1e-5))  # fmt: skip
        assert torch.equal(y, want) and torch.equal(caches[0], case[4]) and torch.equal(caches[1], case[5])
        assert _same_pack(nxt, kernels.pack_act(want.view(1, -1), heads * dh, norm=norm, eps=1e-5))
        assert not counter.any()
    for kw in (dict(split=False, pack_next=kernels.NextPack(counter)), dict(split=True, pack_next=kernels.NextPack(counter[:heads]))):
        with pytest.raises(kernels.KernelShapeError):
            kernels.decode_attention(*case, heads, kv, dh, **kw)


def test_advance_is_the_four_state_updates():
    # kernels.advance does what GraphDecoder._step's torch ops did: out[n] = tok = nxt, pos += 1, n += 1; at
    # n = S nothing is written past out (index_copy_ would raise there); bad buffers are refused
    for n0, size in ((0, 8), (5, 8), (7, 8), (8, 8)):
        out = torch.arange(size, dtype=torch.long, device=DEV) * 10
        nxt, n, tok, pos = (torch.tensor(v, device=DEV) for v in ([42], [n0], [[3]], [n0 + 4]))
        want = out.clone()
        if n0 < size:
            want[n0] = 42
        kernels.advance(nxt, out, n, tok, pos)
        assert torch.equal(out, want) and tok.item() == 42 and pos.item() == n0 + 5 and n.item() == n0 + 1
    with pytest.raises(kernels.KernelShapeError, match="advance"):
        kernels.advance(nxt.int(), out, n, tok, pos)
    with pytest.raises(kernels.KernelShapeError, match="advance"):
        kernels.advance(torch.tensor([1, 2], device=DEV), out, n, tok, pos)


@interp
@pytest.mark.parametrize("at_once", [False, pytest.param(True, marks=interp)])
def test_argmax_kernel(at_once):
    # one launch, several programs (block 16): torch.argmax's index, ties to the first maximal index across and
    # within blocks; the counter ends at zero. at_once: the programs run together (programs_at_once), so the last
    # to arrive, which reduces the partials, is any of them. The interpreter breaks ties to the left whatever the
    # kernel asks: test_gpu_argmax_ties_at_the_vocabulary_size checks the tie-break on a GPU
    g = torch.Generator().manual_seed(0)
    counter = torch.zeros(1, dtype=torch.int32, device=DEV)
    cases = [torch.randn(n, generator=g) for n in (1, 15, 16, 17, 200)]
    tie = torch.randn(100, generator=g)
    tie[[40, 7, 71]] = 9.0  # ties in two blocks: the first index wins
    cases += [tie, torch.full((50,), float("-inf")), torch.randn(33, generator=g).to(torch.bfloat16)]
    for x in cases:
        with programs_at_once(kernels._argmax_kernel) if at_once else contextlib.nullcontext():
            got = kernels.argmax(x.to(DEV), counter, block=16)
        assert got.dtype == torch.long and got.shape == (1,)
        assert int(got) == int(x.float().argmax()), x
        assert not counter.any()
    assert int(kernels.argmax(tie.to(DEV), counter)) == 7  # the default block: one program
    for bad in (torch.zeros(2, 3), torch.zeros(0), torch.zeros(3, dtype=torch.long)):
        with pytest.raises(kernels.KernelShapeError):
            kernels.argmax(bad.to(DEV), counter)
    with pytest.raises(kernels.KernelShapeError):
        kernels.argmax(tie.to(DEV), counter.float())


@triton.jit
def _uniforms_kernel(rng_ptr, out_ptr, N, BLOCK: tl.constexpr):
    # the Philox numbers that kernels.sample races with, for ids 0..N-1 of the stream rng (seed, draws)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    seed = (tl.load(rng_ptr + 1) << 32) | (tl.load(rng_ptr) & 4294967295)
    tl.store(out_ptr + offs, tl.rand(seed, offs), mask=offs < N)


def _sample_reference(x, temperature, k, top_p, min_p, rng):
    """sample's draw from runtime/sampling.py's filters and the same race argmax(e / -log U): (id, kept)."""
    from bitnet158.runtime.sampling import filter_logits

    y = x / temperature
    kept = ~torch.isinf(filter_logits(y, k, top_p, min_p))
    u = torch.empty_like(x)
    _uniforms_kernel[(triton.cdiv(x.numel(), 64),)](rng, u, x.numel(), BLOCK=64)
    race = torch.where(kept, (y - y.max()).exp() / -u.log(), -1.0)
    return int(race.argmax()), kept


def _sample_cases():
    # (logits, k, top_p, min_p): plain, bf16-rounded and integer-valued logits (many ties), every filter mix,
    # k above the vocabulary, one token, top-p stopping inside a tie group
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=g) * 3
    cases = [(x, k, p, m) for k in (1, 7, 50) for p, m in ((None, None), (0.9113, None), (0.3217, 0.05), (None, 0.2))]
    b = (torch.randn(150, generator=g) * 3).to(torch.bfloat16).float()
    cases += [(b, 7, 0.9113, None), (b, 50, 0.3217, None)]
    ints = torch.randint(-3, 3, (250,), generator=g).float() * 0.7
    cases += [(ints, 1, None, None), (ints, 3, 0.3217, None), (ints, 8, 0.9113, 0.2), (ints, 50, None, None)]
    cases += [(torch.randn(5, generator=g), 50, 0.9113, None), (torch.randn(1, generator=g), 1, None, None)]
    # probabilities 4 : 1 : 1 : 1 : 1 at temperature 0.8; top-k 2 keeps all five (ties); top-p 0.6 keeps the
    # top token and the lowest id of the ties
    cases.append((torch.tensor([0.0, 0.0, 0.0, 0.0, 0.8 * math.log(4)]), 2, 0.6, None))
    zeros = torch.tensor([-0.0, 0.0, -1.0, 0.0, -0.0])  # -0.0 ties with 0.0: top-k 4 + top-p 0.6 keeps ids 0, 1, 3
    cases += [(zeros, 2, 0.6, None), (zeros, 4, 0.6, None)]
    return cases


def _checked_draws(cases, seed: int, at_once: tuple = ()):
    # kernels.sample on each case (logits, k, top_p, min_p) at temperature 0.8, block 32 (several programs), with
    # the launches of the kernels ``at_once`` running their programs together (programs_at_once): the id that the
    # filters of runtime/sampling.py and the race over the kernel's own Philox numbers give, exactly, and as many
    # kept tokens; the draw count advances and the counter ends at zero. Yields (logits, kept mask) of each
    g = torch.Generator().manual_seed(seed)
    counter = torch.zeros(1, dtype=torch.int32)
    for x, k, top_p, min_p in cases:
        rng = torch.tensor([int(torch.randint(0, 2**32, (), generator=g)), int(torch.randint(0, 50, (), generator=g))])
        want, kept = _sample_reference(x, 0.8, k, top_p, min_p, rng)
        draws = int(rng[1])
        with programs_at_once(*at_once) if at_once else contextlib.nullcontext():
            got = kernels.sample(x, torch.tensor([0.8]), k, None if top_p is None else torch.tensor([top_p]),
                                 None if min_p is None else torch.tensor([min_p]), rng, counter, block=32)  # fmt: skip
        # the id, and how many tokens stayed: they are the most likely ones, so the count says which
        assert got.dtype == torch.long and got.shape == (2,)
        assert int(got[0]) == want and int(got[1]) == int(kept.sum()), (x.numel(), k, top_p, min_p)
        assert int(rng[1]) == draws + 1 and not counter.any()
        yield x, kept


@interp
@pytest.mark.parametrize("at_once", [False, True])
def test_sample_kernel(at_once):
    # one launch, several programs: exactly the reference's draw (_checked_draws). Kept tokens past the merged
    # lists (ties at the k-th logit) and top-p cuts inside a tie group both occur (asserted).
    cases = _sample_cases()
    if at_once:
        cases = cases[::3]
    past_lists = cut_in_ties = 0
    for (x, k, _, _), (_, kept) in zip(cases, _checked_draws(cases, 1, (kernels._sample_kernel,) if at_once else ())):
        y = x / 0.8
        past_lists += int(kept.sum()) > triton.next_power_of_2(min(k, x.numel()))
        cut = y[kept].min()
        cut_in_ties += bool(((y == cut) & ~kept).any())
    assert past_lists and cut_in_ties
    if at_once:
        return
    for bad in (dict(x=torch.zeros(2, 3)), dict(x=torch.zeros(4, dtype=torch.float64)), dict(k=0),
                dict(k=kernels.SAMPLE_MAX_K + 1), dict(rng=torch.zeros(2, dtype=torch.int32)),
                dict(top_p=torch.ones(2)), dict(counter=torch.zeros(1)), dict(k=2.0)):  # fmt: skip
        args = dict(x=torch.randn(9), temperature=torch.ones(1), k=3, top_p=None, min_p=None,
                    rng=torch.zeros(2, dtype=torch.long), counter=torch.zeros(1, dtype=torch.int32)) | bad  # fmt: skip
        with pytest.raises(kernels.KernelShapeError):
            kernels.sample(**args)


def _vocab_cases():
    # (logits, top_p, min_p) for sample without a top-k: _sample_cases' logits and filters, and larger ones over
    # many programs: bf16-rounded values (ties), a flat run where the cut falls inside ties spread over the
    # programs, -inf logits (a whole block of them) and a nucleus of nearly everything
    seen, cases = set(), []
    for x, _, p, m in _sample_cases():
        if (id(x), p, m) not in seen:
            seen.add((id(x), p, m))
            cases.append((x, p, m))
    g = torch.Generator().manual_seed(3)
    b = (torch.randn(700, generator=g) * 2).to(torch.bfloat16).float()
    flat = torch.randn(600, generator=g) * 0.01
    flat[100:500] = 0.25  # 400 ties in 13 blocks of 32, all in the nucleus's last part
    inf = torch.randn(300, generator=g)
    inf[64:128] = float("-inf")  # two whole blocks
    inf[200:210] = float("-inf")
    cases += [(b, 0.9113, None), (b, 0.5117, 0.01), (flat, 0.8013, None), (flat, 0.3011, None), (inf, 0.9113, None),
              (inf, None, 0.05), (torch.randn(500, generator=g) * 0.1, 0.9917, None)]  # fmt: skip
    return cases


@interp
@pytest.mark.parametrize("at_once", [False, True])
def test_sample_kernel_without_top_k(at_once):
    # sample(k=None): the radix select of the top-p cut over several programs and the race give exactly the
    # reference's draw (_checked_draws); top-p cuts inside a tie group, with the kept ties and the dropped ones
    # in different programs, occur (asserted). at_once: each launch's last program to arrive is any of them
    cases = [(x, None, p, m) for x, p, m in _vocab_cases()]
    if at_once:
        cases = cases[::2]
    cut_across = 0
    for x, kept in _checked_draws(cases, 2, (kernels._nucleus_level_kernel, kernels._nucleus_race_kernel) if at_once else ()):
        y = x / 0.8
        cut = y[kept].min()
        at_cut = (y == cut).nonzero()[:, 0] // 32  # the blocks of the ties at the cut
        cut_across += bool(((y == cut) & ~kept).any()) and int(at_cut.min()) != int(at_cut.max())
    assert cut_across


@interp
def test_sample_without_top_k_draws_in_proportion():
    # consecutive draws of one stream without a top-k (here min-p 0.05: the two launches of the draw without the
    # top-p levels, whose cut the test above checks exactly): each kept token about as often as its probability
    # after the filter, the others never. e = exp(x − 2) ≥ 0.05 keeps x ≥ -0.996: all but the last
    x = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -3.0])
    kept = x[:5].softmax(-1)
    rng = torch.tensor([54321, 0])
    counter = torch.zeros(1, dtype=torch.int32)
    n = 300
    ids = [int(kernels.sample(x, torch.ones(1), None, None, torch.tensor([0.05]), rng, counter)[0]) for _ in range(n)]
    freq = torch.bincount(torch.tensor(ids), minlength=6).double() / n
    assert freq[5] == 0
    assert torch.all((freq[:5] - kept.double()).abs() < 4 * (kept * (1 - kept) / n).sqrt().double()), freq


@interp
def test_sample_draws_in_proportion():
    # consecutive draws of one stream (as graph replays make them): each kept token about as often as its
    # probability after the filters, the others never
    # top-k 4 leaves p ≈ (0.455, 0.276, 0.167, 0.102); top-p 0.85 then drops the fourth (0.898 above it)
    x = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -3.0])
    kept = torch.tensor([2.0, 1.5, 1.0]).softmax(-1)
    rng = torch.tensor([12345, 0])
    counter = torch.zeros(1, dtype=torch.int32)
    n = 600
    ids = [int(kernels.sample(x, torch.ones(1), 4, torch.tensor([0.85]), None, rng, counter)[0]) for _ in range(n)]
    freq = torch.bincount(torch.tensor(ids), minlength=6).double() / n
    assert freq[3:].sum() == 0
    assert torch.all((freq[:3] - kept.double()).abs() < 4 * (kept * (1 - kept) / n).sqrt().double()), freq


# --- prefill matmul -------------------------------------------------------------------------------------------
@interp
@pytest.mark.parametrize("M,N,K", [(17, 45, 300), (5, 33, 290), (32, 64, 128), (1, 3, 5)])
@pytest.mark.parametrize("int8_dot", [True, False])
def test_matmul_exact(M, N, K, int8_dot):
    x, packed, scale = rand_case(M, N, K, per_row=(N % 2 == 1), seed=N + K)
    y = kernels.bitlinear_matmul(x, packed, scale, K, int8_dot=int8_dot)
    assert_out(y, ref_y(x, packed, scale, K))


@interp
@pytest.mark.parametrize("M", [1, 3, 17])
def test_bitlinear_backend_equals_reference_module(M):
    x, packed, scale = rand_case(M, 27, 192, per_row=True, seed=M)
    lin = BitLinear(packed, scale, 192)
    ref = lin(x.view(1, M, 192))
    lin.backend = "triton"
    y = lin(x.view(1, M, 192))
    assert_out(y, ref)


# --- fused segments keep their own scales ---------------------------------------------------------------------
@interp
@pytest.mark.parametrize("M", [1, 6])
def test_fused_segments_keep_their_scales(M):
    from bitnet158.runtime.fast import fuse_bitlinears

    K = 128
    parts = []
    for i, (n, sc) in enumerate([(40, 0.25), (12, 3.0), (12, 1.7)]):  # q, k, v with distinct per-tensor scales
        t = torch.randint(-1, 2, (n, K), generator=torch.Generator().manual_seed(i))
        parts.append(BitLinear(pack_t2(t), torch.tensor([sc]), K))
    x = torch.randn(M, K)
    separate = torch.cat([p(x) for p in parts], dim=-1)
    fused = fuse_bitlinears(parts)
    assert fused.scale.shape == (64,) and torch.equal(fused.scale[40:52], torch.full((12,), 3.0))
    for backend in ("reference", "triton"):
        fused.backend = backend
        assert_out(fused(x), separate)
    # the parts now view the fused bytes and still compute what they did
    assert parts[1].packed.data_ptr() == fused.packed[40:].data_ptr()
    assert_out(torch.cat([p(x) for p in parts], dim=-1), separate)
    # the bug this guards against: one scale for every row changes the k and v segments
    wrong = BitLinear(fused.packed, torch.tensor([0.25]), K)(x)
    assert not torch.allclose(wrong[:, 40:], separate[:, 40:])


# --- int8 head ------------------------------------------------------------------------------------------------
@interp
@pytest.mark.parametrize("D", [64, 30])
def test_head_int8(D):
    w = torch.randn(50, D)
    wq, ws = quantize_head(w)
    assert wq.shape == (50, (D + 3) // 4 * 4) and wq.dtype == torch.int8
    assert bool(((wq[:, :D].float() * ws[:, None] - w).abs() <= ws[:, None] / 2 + 1e-6).all())
    x = torch.randn(3, D)
    q, s = quantize_activations(x)
    ref = (q.long() @ wq[:, :D].long().T).float() * ws / s
    assert torch.equal(kernels.head_int8(x, wq, ws), ref)
    assert torch.equal(int8_head_logits(x, wq, ws), ref)  # the other backends' arithmetic


# --- fused norm / activation kernels ---------------------------------------------------------------------------
def _norm_refs(x, res, w, gu, wi):
    from bitnet158.runtime.model import RMSNorm

    h = res + x
    g, u = gu.chunk(2, dim=-1)
    z = RMSNorm(wi, 1e-5)(torch.square(torch.nn.functional.relu(g)) * u)
    return RMSNorm(w, 1e-5)(x), h, RMSNorm(w, 1e-5)(h), z


@interp
def test_rmsnorm_and_act_mul_norm_kernels():
    g = torch.Generator().manual_seed(5)
    x, res = torch.randn(3, 1, 200, generator=g), torch.randn(3, 1, 200, generator=g)
    w, wi = 1 + 0.1 * torch.randn(200, generator=g), 1 + 0.1 * torch.randn(70, generator=g)
    gu = torch.randn(3, 1, 140, generator=g)
    n_ref, h_ref, hn_ref, z_ref = _norm_refs(x, res, w, gu, wi)
    torch.testing.assert_close(kernels.rmsnorm(x, w, 1e-5), n_ref, rtol=1e-6, atol=1e-6)
    h, hn = kernels.rmsnorm(x, w, 1e-5, residual=res)
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(hn, hn_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kernels.act_mul_norm(gu, wi, 1e-5, relu2=True), z_ref, rtol=1e-6, atol=1e-6)
    g_, u_ = gu.chunk(2, dim=-1)
    silu = kernels.act_mul_norm(gu, None, 0.0, relu2=False)
    torch.testing.assert_close(silu, torch.nn.functional.silu(g_) * u_, rtol=1e-5, atol=1e-6)


# --- the fast model against the reference network -------------------------------------------------------------
class _MemSource:
    """The weight-source read surface (PACKED.md names) over in-memory tensors: floats, or (packed, scale, K)."""

    def __init__(self, config: dict, tokenizer: dict, tensors: dict):
        self.config, self.tokenizer, self._t = config, tokenizer, tensors
        self.tensors = {
            n: SimpleNamespace(dtype="t2" if isinstance(v, tuple) else "f32", shape=_shape(v)) for n, v in tensors.items()
        }

    def torch(self, name):
        return self._t[name]

    def ternary(self, name):
        packed, scale, _ = self._t[name]
        return packed, scale

    def close(self):
        pass


def _shape(v):
    return (v[0].shape[0], v[2]) if isinstance(v, tuple) else tuple(v.shape)


def tiny_model(device=DEV, dtype=torch.float32, seed=0, vocab=61, hidden=64, inter=160, layers=2, relu2=True, sub_norms=True):
    from bitnet158.runtime.loader import build_model
    from tokenizers import Tokenizer, models

    heads, kv, hd = 4, 2, 16
    config = {
        "family": "bitnet", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd, "vocab_size": vocab,
        "max_position_embeddings": 256, "rope_theta": 10000.0, "rope_style": "neox", "rope_scaling": None,
        "rms_norm_eps": 1e-5, "hidden_act": "relu2" if relu2 else "silu", "sub_norms": sub_norms,
        "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": [1],
    }  # fmt: skip
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tokenizer = {"tokenizer_json": tok.to_str(), "chat_template": None, "bos_token": None, "eos_token": None,
                 "add_bos_token": False, "add_eos_token": False}  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    tensors: dict = {"embed.weight": torch.randn(vocab, hidden, generator=g), "norm.weight": 1 + 0.1 * torch.randn(hidden, generator=g)}
    shapes = {"attn.q_proj": (heads * hd, hidden), "attn.k_proj": (kv * hd, hidden), "attn.v_proj": (kv * hd, hidden),
              "attn.o_proj": (hidden, heads * hd), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}  # fmt: skip
    for i in range(layers):
        for name, (n, k) in shapes.items():
            t = torch.randint(-1, 2, (n, k), generator=g)
            scale = torch.rand(n if name == "attn.k_proj" else 1, generator=g) + 0.5  # one per-row-scaled matrix
            tensors[f"layers.{i}.{name}.weight"] = (pack_t2(t), scale, k)
        for name, n in (("attn_norm", hidden), ("mlp_norm", hidden), ("attn.sub_norm", heads * hd), ("mlp.sub_norm", inter)):
            if "sub_norm" in name and not sub_norms:
                continue
            tensors[f"layers.{i}.{name}.weight"] = 1 + 0.1 * torch.randn(n, generator=g)
    return build_model(_MemSource(config, tokenizer, tensors), device=device, dtype=dtype)


def _ref_last_logits(net, ids):
    net.setup_cache(1, 64)
    return net(torch.tensor([ids], device=net.device), 0)[0, -1]


def test_fast_path_refuses_misuse():
    from bitnet158.runtime.fast import FastModel, FastPathError, GraphDecoder, fuse_bitlinears

    net = tiny_model(layers=1).net
    attn = net.layers[0].attn
    with pytest.raises(FastPathError, match=r"in_features differ: \[64, 160\]"):
        fuse_bitlinears([attn.q_proj, net.layers[0].mlp.down_proj])
    fast = FastModel(net, backend="reference")
    with pytest.raises(FastPathError, match="head must be one of"):
        fast.set_head("int4")
    if not HAS_CUDA:
        with pytest.raises(FastPathError, match="CUDA graphs need a CUDA device"):
            GraphDecoder(fast, 16, use_graph=True)
    dec = GraphDecoder(fast, 16, use_graph=False)
    for tokens, start in ((torch.zeros(1, 2, dtype=torch.long), net.max_seq - 1),
                          (torch.zeros(net.max_batch + 1, 1, dtype=torch.long), 0)):
        with pytest.raises(FastPathError, match=r"exceed the cache \(16 / 1\)"):
            fast.logits_last(tokens, start)
    for prompt, n, message in (([], 3, "need a non-empty prompt and max_new_tokens >= 1"),
                               ([3], 0, "need a non-empty prompt and max_new_tokens >= 1"),
                               ([3] * 10, 7, "prompt 10 \\+ 7 new tokens exceed the decoder's max_seq 16")):
        with pytest.raises(FastPathError, match=message):
            list(dec.generate(prompt, n))


@interp
def test_fast_model_matches_reference_network():
    from bitnet158.runtime.fast import FastModel, GraphDecoder
    from bitnet158.runtime.generate import generate_tokens
    from bitnet158.runtime.sampling import Sampler, SamplingParams

    model = tiny_model()
    net = model.net
    ids = [3, 14, 15, 9, 26, 5, 35]
    with torch.inference_mode():
        ref = _ref_last_logits(net, ids)
        ref_tokens = list(generate_tokens(net, ids, 6, Sampler(SamplingParams())))
        dec = GraphDecoder(FastModel(net, backend="reference"), 64, use_graph=False, chunk=4)
        torch.testing.assert_close(dec.prefill(ids), ref, rtol=1e-5, atol=1e-5)
        assert list(dec.generate(ids, 6)) == ref_tokens
        # stop ids end the stream before the stop token
        assert list(dec.generate(ids, 6, stop_ids=[ref_tokens[3]])) == ref_tokens[: ref_tokens.index(ref_tokens[3])]
        # sampling is seeded and reproducible; top_k=1 is greedy
        a = list(dec.generate(ids, 5, temperature=0.8, top_p=0.9, seed=7))
        assert a == list(dec.generate(ids, 5, temperature=0.8, top_p=0.9, seed=7))
        assert list(dec.generate(ids, 5, temperature=0.8, top_k=1, seed=1)) == ref_tokens[:5]
        assert list(dec.generate(ids, 5, temperature=5.0, min_p=1.0, seed=1)) == ref_tokens[:5]  # only the top id
        # the repetition penalty on the device (a mask of the prompt's and the generated ids) decodes as the
        # Sampler does, above 1 and below; each changes the greedy ids here, so a lost penalty would show
        for pen in (1.3, 0.7):
            want = list(generate_tokens(net, ids, 8, Sampler(SamplingParams(repetition_penalty=pen))))
            assert want[:6] != ref_tokens
            assert list(dec.generate(ids, 8, repetition_penalty=pen)) == want
        # reuse: after a generation stopped by a stop id (the device ran ahead of it: chunk 4), the cache holds
        # the prompt and the ids the steps ran; a prompt that extends them runs only its new tokens
        stop = ref_tokens[3]
        assert list(dec.generate(ids, 6, stop_ids=[stop])) == ref_tokens[:3]
        assert dec.context()[: len(ids) + 3] == ids + ref_tokens[:3]
        longer = ids + ref_tokens[:3] + [stop, 11]
        stats = GenerationStats()
        want = list(generate_tokens(net, longer, 5, Sampler(SamplingParams())))
        assert list(dec.generate(longer, 5, reuse=True, stats=stats)) == want
        assert stats.cached_tokens == len(ids) + 4  # the stop id ran too (run-ahead)
        # the whole context again: the last token still runs; another first token: nothing is reused
        assert list(dec.generate(longer, 5, reuse=True, stats=stats)) == want and stats.cached_tokens == len(longer) - 1
        assert list(dec.generate([5, *longer[1:]], 2, reuse=True, stats=stats)) and stats.cached_tokens == 0
        dec.forget()
        assert list(dec.generate(longer, 5, reuse=True, stats=stats)) == want and stats.cached_tokens == 0


def test_device_repetition_penalty_equals_the_samplers():
    from bitnet158.runtime.fast import penalize_on_device
    from bitnet158.runtime.sampling import apply_repetition_penalty

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(300, generator=g) * 4
    logits[::7] = 0.0  # zero: divided, as the Sampler does (score < 0 is the multiplied side)
    seen = torch.tensor([3, 7, 7, 0, 299, 150, 3, 42])  # repeats count once
    mask = torch.zeros(300, dtype=torch.bool)
    mask[seen] = True
    for pen in (1.3, 0.7, 1.0, 2.5):
        want = apply_repetition_penalty(logits, seen, pen)
        assert torch.equal(penalize_on_device(logits, mask, torch.tensor([pen])), want)


@interp
def test_fast_model_triton_backend():
    # the kernels inside the whole forward (prefill: matmul; decode: GEMV); one layer keeps the interpreter quick
    from bitnet158.runtime.fast import FastModel, GraphDecoder
    from bitnet158.runtime.generate import generate_tokens
    from bitnet158.runtime.sampling import Sampler, SamplingParams

    net = tiny_model(layers=1, seed=2).net
    ids = [3, 14, 15, 9, 26]
    with torch.inference_mode():
        ref = _ref_last_logits(net, ids)
        ref_tokens = list(generate_tokens(net, ids, 3, Sampler(SamplingParams())))
        dec = GraphDecoder(FastModel(net, backend="triton"), 64, use_graph=False)
        torch.testing.assert_close(dec.prefill(ids), ref, rtol=1e-5, atol=1e-5)
        assert list(dec.generate(ids, 3)) == ref_tokens
        # a prompt that extends the last generation runs its new tokens from their positions (start_pos > 0)
        longer = ids + ref_tokens + [7, 8]
        stats = GenerationStats()
        want = list(generate_tokens(net, longer, 3, Sampler(SamplingParams())))
        assert list(dec.generate(longer, 3, reuse=True, stats=stats)) == want
        assert stats.cached_tokens == len(ids) + 2


def _attention_case(dtype, heads, kv, dh, slots, pos, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(1, 1, (heads + 2 * kv) * dh, generator=g).to(dtype).to(DEV)
    cache_k, cache_v = (torch.randn(1, kv, slots, dh, generator=g).to(dtype).to(DEV) for _ in range(2))
    ang = torch.rand(slots, dh // 2, generator=g) * 6  # a different rotation at each position: the tables [S, Dh]
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().to(dtype).to(DEV), ang.sin().to(dtype).to(DEV)
    return qkv, cos, sin, torch.tensor([pos], device=DEV), cache_k, cache_v


def _attention_ref(qkv, cos, sin, pos, cache_k, cache_v, heads, kv, dh):
    from bitnet158.runtime.model import attend

    k2, v2 = cache_k.clone(), cache_v.clone()
    mask = (torch.arange(k2.shape[2], device=DEV) <= pos)[None]  # the graph step's mask: keys 0..pos
    y = attend(*qkv.split([heads * dh, kv * dh, kv * dh], -1), cos[pos], sin[pos], pos, mask, k2, v2, heads, kv, dh)
    return y, k2, v2


@pytest.mark.parametrize("heads,kv,dh,slots,pos", [(4, 2, 16, 40, 0), (4, 2, 16, 40, 23), (4, 4, 12, 40, 39),
                                                    (6, 2, 12, 70, 65), (4, 2, 8, 300, 290)])  # fmt: skip
@pytest.mark.parametrize("split", [False, True])
def test_decode_attention_kernel(heads, kv, dh, slots, pos, split):
    # fp32: rope and the cache write are the torch ops bit for bit; the attention sums in another order. split:
    # flash-decoding over chunks of 16 keys in the interpreter (3 or 5 chunks here, some empty at small pos); at
    # 300 slots chunks of 32 keys, two blocks each: the pipelined loop (PIPE), also in every unsplit case
    assert kernels._attention_splits(300)[:2] == (16, 32)
    case = _attention_case(torch.float32, heads, kv, dh, slots, pos)
    want, k2, v2 = _attention_ref(*case, heads, kv, dh)
    got = kernels.decode_attention(*case, heads, kv, dh, split=split)
    assert torch.equal(case[4], k2) and torch.equal(case[5], v2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # bf16: to bf16 rounding (the interpreter's casts truncate; tests/test_kernels.py's docstring)
    case = _attention_case(torch.bfloat16, heads, kv, dh, slots, pos, seed=1)
    want, k2, v2 = _attention_ref(*case, heads, kv, dh)
    got = kernels.decode_attention(*case, heads, kv, dh, split=split)
    torch.testing.assert_close(case[4].float(), k2.float(), rtol=0, atol=0.04)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.04)
    with pytest.raises(kernels.KernelShapeError):
        kernels.decode_attention(case[0][..., :-1], *case[1:], heads, kv, dh)
    with pytest.raises(kernels.KernelShapeError, match="rope tables"):  # a row, not the table
        kernels.decode_attention(case[0], case[1][pos : pos + 1], *case[2:], heads, kv, dh)


def test_kernel_wrappers_refuse_bad_operands():
    # every wrapper checks its operands before it launches: one KernelShapeError naming what is wrong (x on the
    # meta device stands for "another device")
    x, packed, scale = rand_case(2, 8, 64, per_row=True)
    x2, packed2, scale2 = rand_case(1, 8, 36, per_row=False)  # 9 bytes a row: not whole words
    wq, ws = quantize_head(torch.randn(9, 64).to(DEV))
    w = torch.ones(64, device=DEV)
    case = _attention_case(torch.float32, 4, 2, 16, 40, 3)
    qkv, cos, sin, pos, cache_k, cache_v = case
    for call, message in (
        (lambda: kernels.bitlinear_gemv(x.int(), packed, scale, 64), "x must be a float tensor, got torch.int32"),
        (lambda: kernels.bitlinear_gemv(x, packed[:, :-4], scale, 64), r"packed must be uint8 \[N, 16\] with unit"),
        (lambda: kernels.bitlinear_gemv(x, packed, scale.double(), 64), r"scale must be f32 \[1\] or \[8\]"),
        (lambda: kernels.bitlinear_gemv(x.to("meta"), packed, scale, 64), "must be on one device"),
        (lambda: kernels.quantize_act(x[0]), r"quantize_act: x must be a float \[M, K\] tensor"),
        (lambda: kernels.quantize_act(x.int()), r"quantize_act: x must be a float \[M, K\] tensor"),
        (lambda: kernels.bitlinear_gemv_packed(kernels.pack_act(x2, 36), packed2, scale2, x2.dtype),
         "row bytes 9 must be 12 \\(whole words\\)"),
        (lambda: kernels.head_int8(x, wq.float(), ws), "wq must be int8"),
        (lambda: kernels.head_int8(x[:, :60], wq, ws), r"x must be \[M, D\] with ceil\(D/4\)·4 = 64"),
        (lambda: kernels.head_int8(x, wq, ws[:-1]), r"scale must be f32 \[9\]"),
        (lambda: kernels.rmsnorm(x.int(), w, 1e-5), "rmsnorm: expected a float tensor"),
        (lambda: kernels.rmsnorm(x, w[:-1], 1e-5), r"rmsnorm: weight must be \[64\]"),
        (lambda: kernels.rmsnorm(x, w, 1e-5, residual=x[:1]), r"rmsnorm: residual \(1, 64\) does not match"),
        (lambda: kernels.act_mul_norm(x[:, :63], None, 1e-5, True), "the last dim must be 2·I, got 63"),
        (lambda: kernels.act_mul_norm(x, w, 1e-5, True), r"act_mul_norm: weight must be \[32\]"),
        (lambda: kernels.decode_attention(*case, 2, 3, 16), "decode_attention: heads 2/3"),  # the same width
        (lambda: kernels.decode_attention(qkv, cos, sin, pos.int(), cache_k, cache_v, 4, 2, 16), "pos int64 \\[1\\]"),
    ):
        with pytest.raises(kernels.KernelShapeError, match=message):
            call()


def test_l2_prefetch_covers_each_line_once():
    # kernels._l2_prefetch's split of a region's 128-byte lines over the programs, counted instead of prefetched
    # (COUNT): every line of the region once, nothing past it, whether programs outnumber lines or not
    @triton.jit
    def count(buf, nbytes, cnt, BLOCK: tl.constexpr):
        kernels._l2_prefetch(buf, nbytes, tl.program_id(0), tl.num_programs(0), cnt, BLOCK, False, True)

    buf = torch.zeros(64, dtype=torch.int32, device=DEV)
    for nbytes, programs, block in ((1, 1, 4), (128, 3, 4), (129, 3, 4), (5000, 7, 4), (5000, 2, 16), (640, 40, 4)):
        cnt = torch.zeros(64, dtype=torch.int32, device=DEV)
        count[(programs,)](buf, nbytes, cnt, block)
        lines = -(-nbytes // 128)
        assert cnt[:lines].eq(1).all() and cnt[lines:].eq(0).all(), (nbytes, programs, cnt)


def test_decode_attention_prefetch_is_checked_and_changes_nothing():
    # prefetch (L2 hints, nothing under the interpreter) leaves the output alone; bad regions are refused
    case = _attention_case(torch.float32, 4, 2, 16, 40, 23)
    want = kernels.decode_attention(*case, 4, 2, 16, split=True)
    regions = [torch.zeros(300, dtype=torch.uint8, device=DEV), torch.zeros(7, 5, dtype=torch.int32, device=DEV)]
    case = _attention_case(torch.float32, 4, 2, 16, 40, 23)
    assert torch.equal(kernels.decode_attention(*case, 4, 2, 16, split=True, prefetch=regions), want)
    for bad in ([regions[1][:, :2]], regions * 3):  # not contiguous; six regions
        with pytest.raises(kernels.KernelShapeError, match="prefetch"):
            kernels.decode_attention(*case, 4, 2, 16, split=True, prefetch=bad)


@interp
def test_fast_model_attention_kernel_in_the_graph_step():
    # the tensor-position step (the one CUDA graphs capture) with the attention kernel equals the torch attention
    from bitnet158.runtime.fast import FastModel, FastPathError

    net = tiny_model(layers=1, seed=3).net
    ids = [3, 14, 15, 9, 26]
    with pytest.raises(FastPathError, match="attention must be one of"):
        FastModel(net, backend="reference", attention="flash")
    with torch.inference_mode():
        steps = {}
        for attention in ("torch", "triton", "split", "split+after", "split+before"):
            # the kernels go with the triton backend (the reference backend keeps the torch attention: below)
            name, _, prefetch = attention.partition("+")
            fast = FastModel(net, backend="triton", attention=name, gemv="plain", prefetch=prefetch or "off")
            net.setup_cache(1, 32)
            fast.logits_last(torch.tensor([ids]), 0)
            steps[attention] = [
                fast.logits_last(torch.tensor([[t]]), torch.tensor([5 + i])) for i, t in enumerate([7, 1, 8])
            ]
    for attention in ("triton", "split"):
        for a, b in zip(steps["torch"], steps[attention]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for prefetch in ("after", "before"):  # L2 hints only
        assert all(torch.equal(a, b) for a, b in zip(steps["split"], steps[f"split+{prefetch}"]))
    with pytest.raises(FastPathError, match="prefetch must be one of"):
        FastModel(net, backend="triton", prefetch=True)
    # what the prefetch brings in after each layer's attention: its o, gate|up and down, then the next q/k/v
    net2 = tiny_model(layers=2, seed=3).net
    fast = FastModel(net2, backend="triton", prefetch="after")
    l0, l1 = net2.layers
    assert [t.data_ptr() for t in fast._prefetch_after(0)] == [t.data_ptr() for t in (
        l0.attn.o_proj.packed, fast.gate_up[0].packed, l0.mlp.down_proj.packed, fast.qkv[1].packed)]  # fmt: skip
    assert len(fast._prefetch_after(1)) == 3 and FastModel(net2, backend="triton")._prefetch_after(0) == []
    # the reference backend never calls a kernel, whatever the attention option says (``--reference`` A/B checks)
    with torch.inference_mode(), patch.object(kernels, "decode_attention", side_effect=AssertionError("kernel called")):
        fast = FastModel(net, backend="reference", attention="split")
        net.setup_cache(1, 32)
        fast.logits_last(torch.tensor([ids]), 0)
        torch.testing.assert_close(fast.logits_last(torch.tensor([[7]]), torch.tensor([5])), steps["torch"][0], rtol=1e-5, atol=1e-5)


@interp
@pytest.mark.parametrize("relu2,sub_norms", [(True, True), (False, False)])
def test_fast_model_packed_gemv_steps(relu2, sub_norms):
    # gemv="packed" (pack_act + lean GEMV) against "plain" (the separate kernels), in
    # the tensor-position step that CUDA graphs capture (with the attention kernel) and in the host-position
    # step; and greedy tokens as the reference network's
    from bitnet158.runtime.fast import FastModel, FastPathError, GraphDecoder
    from bitnet158.runtime.generate import generate_tokens
    from bitnet158.runtime.sampling import Sampler, SamplingParams

    net = tiny_model(layers=1, seed=6, relu2=relu2, sub_norms=sub_norms).net
    with pytest.raises(FastPathError, match="gemv must be one of"):
        FastModel(net, gemv="fast")
    ref_tokens = list(generate_tokens(net, [3], 3, Sampler(SamplingParams()))) if relu2 else None
    with torch.inference_mode():  # (short: every GEMV runs in Triton's interpreter)
        steps = {}
        for gemv in ("plain", "packed"):
            fast = FastModel(net, backend="triton", attention="triton" if relu2 else "split", gemv=gemv)
            net.setup_cache(1, 16)
            steps[gemv] = [fast.logits_last(torch.tensor([[7]]), torch.tensor([0])), fast.logits_last(torch.tensor([[1]]), 1)]
            if gemv != "plain":
                assert fast._fusable == [True]
                if relu2:
                    assert list(GraphDecoder(fast, 16, use_graph=False).generate([3], 3)) == ref_tokens, gemv
    for a, b in zip(steps["plain"], steps["packed"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fast_model_searched_tiles_reach_the_graph_step(monkeypatch):
    # tiles="searched": the pick for each site (q/k/v, o, gate|up, down) goes to that site's one-row packed GEMVs,
    # in every layer; inputs of several rows keep the autotuner (config None), so does tiles="autotune". A tile
    # changes the order of integer sums only: the logits stay the same bit for bit
    from bitnet158.runtime.fast import SITES, FastModel, FastPathError

    net = tiny_model(layers=2, seed=6).net
    with pytest.raises(FastPathError, match="tiles must be one of"):
        FastModel(net, tiles="fastest")
    fast = FastModel(net, backend="triton", gemv="packed")
    assert fast.tiles == "searched" and fast.tile_pick is None
    seen = []  # (rows, config) of each packed GEMV launch
    packs = []  # (rows, warps) of each pack_act launch
    real, real_pack = kernels.bitlinear_gemv_packed, kernels.pack_act
    monkeypatch.setattr(kernels, "bitlinear_gemv_packed", lambda a, *r, **kw: seen.append((a.xq.shape[0], kw.get("config"))) or real(a, *r, **kw))
    monkeypatch.setattr(kernels, "pack_act", lambda x, *r, **kw: packs.append((x.shape[0], kw.get("warps"))) or real_pack(x, *r, **kw))
    tok, pos = torch.tensor([[1]]), torch.tensor([2])
    pick = dict(zip(SITES, [(4, 8, 1), (8, 4, 1), (2, 16, 1), (16, 8, 2)]))
    warps = dict(zip(SITES, [8, 16, 2, 4]))
    with torch.inference_mode():
        net.setup_cache(1, 16)
        fast.logits_last(torch.tensor([[7, 2]]), 0)  # a two-token prompt: the GEMVs of two rows
        want = fast.logits_last(tok, pos)
        assert len(seen) == 16 and all(c is None for _, c in seen)
        assert packs == [(2, None)] * 8 + [(1, None)] * 8
        fast.tile_pick, fast.pack_pick = pick, warps
        seen.clear()
        packs.clear()
        fast.logits_last(torch.tensor([[7, 2]]), 0)
        got = fast.logits_last(tok, pos)
        assert seen == [(2, None)] * 8 + [(1, pick[s]) for s in SITES] * 2
        assert packs == [(2, None)] * 8 + [(1, warps[s]) for s in SITES] * 2
        assert torch.equal(got, want)  # the interpreter has no warps: the same arithmetic
        # mid-search (search_tiles times each site's pack warps in turn): a site without a pick yet takes
        # pack_act_launch's warps. A lookup that required every site failed the first capture on a GPU
        fast.pack_pick = {"qkv": 8}
        packs.clear()
        assert torch.equal(fast.logits_last(tok, pos), want)
        assert packs == [(1, 8), (1, None), (1, None), (1, None)] * 2
        fast.tiles = "autotune"
        seen.clear()
        packs.clear()
        fast.logits_last(tok, pos)
        assert seen == [(1, None)] * 8 and packs == [(1, None)] * 8


@interp
def test_pdl_option_reaches_every_decode_kernel(monkeypatch):
    # FastModel(pdl=...) goes to every kernel launch of a decode step, greedy (int8 head) and sampled (the draw
    # with a top-k, then top-p's radix select without one): "early" and "early-packs" to exactly the launches that
    # True reaches, so that an A/B of the early trigger changes nothing else. kernels._pdl maps the option to the
    # launch flags where PDL exists (sm_90+, no interpreter): the early trigger is PDL 2, so _pdl_enter lets the
    # next kernel launch before its wait (tests/test_kernel_compile.py finds that order in the machine code); with
    # "early-packs" only at the launches that read no weights: every pack_act and the attention's combine
    import sys
    from types import SimpleNamespace

    from bitnet158.runtime.fast import PDLS, FastModel, FastPathError, GraphDecoder

    assert PDLS == kernels.PDL_MODES  # FastModel's check (no triton needed) and the kernels' are one list
    net = tiny_model(layers=2, seed=6).net
    with pytest.raises(FastPathError, match="pdl must be one of"):
        FastModel(net, pdl="late")
    real = kernels._pdl
    seen = []  # (pdl, light, the launching function)

    def record(t, pdl, light=False):
        seen.append((pdl, light, sys._getframe(1).f_code.co_name))
        return real(t, pdl, light)

    monkeypatch.setattr(kernels, "_pdl", record)
    ids = [3, 14, 15, 9, 26]
    calls, tokens = {}, {}
    with torch.inference_mode():
        for pdl in (True, "early", "early-packs"):
            fast = FastModel(net, backend="triton", head="int8", pdl=pdl)
            dec = GraphDecoder(fast, 32, use_graph=False)
            seen.clear()
            tokens[pdl] = [list(dec.generate(ids, 3)), list(dec.generate(ids, 3, temperature=0.8, top_k=5, top_p=0.9, seed=1)),
                           list(dec.generate(ids, 3, temperature=0.8, top_p=0.9, seed=1))]  # fmt: skip
            # and the graph step's own kernels (the position on the device: the split attention and its combine),
            # which a GraphDecoder without a graph does not run
            tokens[pdl].append(fast.logits_last(torch.tensor([[7]]), torch.tensor([len(ids) + 2])))
            calls[pdl] = list(seen)
    for pdl in ("early", "early-packs"):
        assert {c[0] for c in calls[pdl]} == {pdl} and [c[1:] for c in calls[pdl]] == [c[1:] for c in calls[True]]
        assert tokens[pdl][:3] == tokens[True][:3]  # the interpreter has no PDL: the same launches, the same values
        assert torch.equal(tokens[pdl][3], tokens[True][3])
    assert {c[0] for c in calls[True]} == {True} and len(calls[True]) > 3 * 2 * 10  # every pack, GEMV, attention, more
    # light: every pack_act launch, and one a split attention launch (its combine); no launch that reads weights
    light = [f for _, lt, f in calls[True] if lt]
    heavy = [f for _, lt, f in calls[True] if not lt]
    assert set(light) == {"pack_act", "decode_attention"} and "pack_act" not in heavy
    assert light.count("decode_attention") == heavy.count("decode_attention") > 0
    assert {"bitlinear_gemv_packed", "head_int8", "argmax", "sample", "advance"} <= set(heavy)
    # the launch flags, on a stand-in for a tensor on an sm_90 GPU outside the interpreter
    monkeypatch.setattr(kernels, "_INTERPRET", False)
    monkeypatch.setattr(kernels, "_sm90", lambda index: True)
    gpu = SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=0))
    off, on, early = {"PDL": 0, "launch_pdl": False}, {"PDL": 1, "launch_pdl": True}, {"PDL": 2, "launch_pdl": True}
    assert [real(gpu, p) for p in (False, True, "early", "early-packs")] == [off, on, early, on]
    assert [real(gpu, p, light=True) for p in (False, True, "early", "early-packs")] == [off, on, early, early]
    assert real(torch.zeros(1), "early") == real(torch.zeros(1), "early-packs", light=True) == off  # the CPU: no PDL
    with pytest.raises(kernels.KernelShapeError, match="pdl must be one of"):
        real(gpu, "late")


def test_search_tiles_descends_site_by_site(monkeypatch, tmp_path, caplog):
    # GraphDecoder.search_tiles' logic with a fake clock (the step's time a sum of per-site costs of the tiles and
    # pack warps in use; CUDA graphs time it on a GPU): each site ends at its cheapest tile, timed with the sites
    # before it at their picks and the sites after it at FIXED_GEMV, then each site's pack at its cheapest warps,
    # the same way (pack_act_launch's warps before their turn); the decoder's position comes back; a second call
    # searches nothing; tiles="autotune", gemv="folded" and (on a GPU) BITNET158_AUTOTUNE=0 without configs
    # search nothing; the folded attention packs o's input itself, so o's pack is not searched. The pick is kept
    # on disk: another model of the same shapes takes it without timing, unless told not to; a model of other
    # shapes, other pack warps to try, a damaged file or one that cannot be written mean a search, and so does a
    # pick timed at a smaller cache's last slot (SEARCH_POS or that slot: the attention's length) where the cache
    # is bigger, which then replaces it
    from bitnet158.runtime.fast import SITES, FastModel, GraphDecoder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    net = tiny_model(layers=1, seed=6).net
    configs = [kernels.FIXED_GEMV, (4, 8, 1), (8, 4, 1)]
    warps = (4, 8)
    cost = {"qkv": [5, 3, 4], "o": [2, 4, 1], "gate_up": [1, 2, 3], "down": [9, 8, 7]}  # per site, by configs
    pack_cost = {"qkv": [0.5, 0.25], "o": [0.25, 0.5], "gate_up": [0.5, 0.25], "down": [0.25, 0.5]}  # by warps
    pack_cost = {s: dict(zip((4, 8, 16), c + [1.0])) for s, c in pack_cost.items()}  # 16 warps: the dearest
    timed = []
    # the first search also runs a real step (the interpreter) in each of its three half-done states of the pack
    # warps: a pick the step cannot take while the search is under way fails there (a lookup of a site's pack
    # warps once did, on a GPU, in every first capture). One step a state, in that search only: each costs seconds
    stepped = set()

    def fake_time_step(self, key, reps):
        pick, packs = self.fast.tile_pick, self.fast.pack_pick
        timed.append((dict(pick), dict(packs), int(self._pos)))
        if len(stepped) < 3 and 0 < len(packs) < len(SITES) and frozenset(packs) not in stepped:
            stepped.add(frozenset(packs))
            self._logits_fn(self._tok, self._pos)
        return float(sum(cost[s][configs.index(pick[s])] + pack_cost[s][packs.get(s, 4)] for s in SITES))

    monkeypatch.setattr(GraphDecoder, "_time_step", fake_time_step)
    fast = FastModel(net, backend="triton")
    dec = GraphDecoder(fast, 40, use_graph=False)  # 40 slots: the real steps stay short
    assert dec.search_tiles(configs=configs, pack_warps=warps) is None  # no graph, nothing to time
    dec.use_graph = True  # the search's own logic from here (the fake clock needs no graph)
    dec._pos.fill_(5)
    pick = dec.search_tiles(configs=configs, pack_warps=warps)
    assert pick == {"qkv": (4, 8, 1), "o": (8, 4, 1), "gate_up": kernels.FIXED_GEMV, "down": (8, 4, 1)}
    assert fast.tile_pick is pick and fast.pack_pick == {"qkv": 8, "o": 4, "gate_up": 8, "down": 4}
    assert int(dec._pos) == 5 and len(timed) == 12 + 8
    assert all(p == 39 for *_, p in timed)  # at SEARCH_POS (256) or the cache's last slot, past the context
    assert timed[3] == ({"qkv": (4, 8, 1), "o": kernels.FIXED_GEMV, "gate_up": kernels.FIXED_GEMV, "down": kernels.FIXED_GEMV}, {}, 39)
    assert timed[13] == (pick, {"qkv": 8}, 39)  # qkv's pack at 8 warps, then o's at 4 with qkv's picked
    assert timed[14] == (pick, {"qkv": 8, "o": 4}, 39)
    assert fast.tile_times["o"] == {configs[0]: 3.0 + 2 + 1 + 9 + 1.5, configs[1]: 3.0 + 4 + 1 + 9 + 1.5, configs[2]: 3.0 + 1 + 1 + 9 + 1.5}
    assert fast.pack_times["gate_up"] == {4: 12.0 + 0.25 + 0.25 + 0.5 + 0.25, 8: 12.0 + 0.25 + 0.25 + 0.25 + 0.25}
    assert len(stepped) == 3  # {qkv}, {qkv, o}, {qkv, o, gate_up}
    assert dec.search_tiles(configs=configs, pack_warps=warps) is pick and len(timed) == 20
    kept = tmp_path / "cache" / "bitnet158" / "gemv_tiles.json"
    first = {**{s: list(c) for s, c in pick.items()}, "pack": fast.pack_pick, "pos": 39}  # timed at slot 39
    assert list(json.loads(kept.read_text()).values()) == [first]

    monkeypatch.setattr("bitnet158.runtime.fast.SEARCH_POS", 150)  # below the tiny model's context (256)

    def searched(model, prefetch="off", attention="split", pack_warps=warps, slots=200, **kw) -> int:
        # how many steps a search on a fresh FastModel of ``model`` timed, in a decoder of ``slots`` positions
        n = len(timed)
        fm = FastModel(model, backend="triton", prefetch=prefetch, attention=attention)
        d = GraphDecoder(fm, slots, use_graph=False)
        d.use_graph = True
        assert d.search_tiles(configs=configs, pack_warps=pack_warps, **kw) == pick
        assert d.fast.pack_pick == {s: fast.pack_pick[s] for s in SITES if not (s == "o" and attention == "folded")}
        assert all(p == min(slots - 1, 150) for *_, p in timed[n:])
        return len(timed) - n

    assert searched(net, slots=30) == 0  # from the file: timed at 39, past this decoder's last slot
    assert searched(net, slots=100) == 20  # this one can time at 99: searched again, and kept instead
    assert [e["pos"] for e in json.loads(kept.read_text()).values()] == [99]
    assert searched(net) == 20 and searched(net, slots=100) == 0  # now at SEARCH_POS, for every later run
    assert searched(net) == 0
    assert searched(net, cached=False) == 20
    assert searched(tiny_model(layers=1, seed=7, inter=96).net) == 20  # other shapes: another key
    assert searched(net, prefetch="after") == 20  # the step it times differs: another key
    assert searched(net, attention="folded") == 12 + 6  # no pack_act before o
    assert searched(net, pack_warps=(4, 8, 16)) == 12 + 12  # other warps to try: another key
    assert len(json.loads(kept.read_text())) == 5
    kept.write_text("{not json")
    assert searched(net) == 20 and len(json.loads(kept.read_text())) == 1
    entry_key, entry = next(iter(json.loads(kept.read_text()).items()))
    for damaged in ({**entry, "qkv": 5}, {**entry, "o": [float(v) for v in entry["o"]]},
                    {**entry, "pack": {**entry["pack"], "down": 4.0}}, {**entry, "pack": None},
                    {**entry, "pos": "256"}, {k: v for k, v in entry.items() if k != "pos"}):
        kept.write_text(json.dumps({entry_key: damaged}))  # hand-edited: searched again, not taken nor a crash
        assert searched(net) == 20 and json.loads(kept.read_text())[entry_key] == entry
    monkeypatch.setenv("XDG_CACHE_HOME", str(kept))  # a file where the folder would go: searched, not kept
    assert searched(net) == 20 and searched(net) == 20
    monkeypatch.setattr(GraphDecoder, "_record", lambda self, key, warm: "graph")  # a capture without CUDA
    n = len(timed)
    for opts in ({"tiles": "autotune"}, {"gemv": "folded"}, {}):
        other = GraphDecoder(FastModel(net, backend="triton", **opts), 200, use_graph=False)
        other.use_graph = True
        assert other._capture(other.sampling_key()) == "graph"
        assert other.fast.tile_pick is None and other.fast.pack_pick is None  # the default: no tuning on the CPU
    assert len(timed) == n

    # a search that fails (a tile this GPU cannot compile) leaves the capture to the autotuner's tiles, with a warning
    def no_such_tile(self, key, reps):
        raise RuntimeError("out of shared memory")

    monkeypatch.setattr(GraphDecoder, "_time_step", no_such_tile)
    monkeypatch.setattr(kernels, "autotuning", lambda: True)
    failing = GraphDecoder(FastModel(net, backend="triton"), 200, use_graph=False)
    failing.use_graph = True
    with caplog.at_level(logging.WARNING, logger="bitnet158.runtime.fast"):
        assert failing._capture(failing.sampling_key()) == "graph"
    assert "tile search failed (RuntimeError: out of shared memory); using autotuned tiles" in caplog.text
    assert failing.fast.tiles == "autotune" and failing.fast.tile_pick is None and failing.fast.pack_pick is None


@contextlib.contextmanager
def programs_at_once(*jitted):
    """Under the interpreter, run each launch of these kernels with all its programs at once, a thread each, as a
    GPU runs resident programs, instead of one after another: the last program to arrive on a counter is then
    whichever gets there last. The interpreter's
    program index becomes per thread; the GIL switches threads every 0.1 ms, between interpreted operations, so
    the programs interleave finely (each atomic is one operation). It uses the interpreter's internals (its
    builder's grid_idx / grid_dim and InterpretedFunction.rewritten_fn, as in Triton 3.6 and 3.9)."""
    from triton.runtime import interpreter as ti

    builder, local = ti.interpreter_builder, threading.local()
    cache = ti.InterpretedFunction.rewritten_fn
    programs = {k.fn: k.rewrite() for k in jitted}  # the interpreter's Python version of each kernel

    def at_once(program):
        def launch(**args):
            # the interpreter calls this once per program: program (0, 0, 0)'s call runs them all, the others return
            if builder.grid_idx != (0, 0, 0):
                return
            failed = []

            def run(idx):
                local.idx = idx
                try:
                    program(**args)
                except BaseException as e:  # re-raised in the launching thread
                    failed.append(e)

            nx, ny, nz = builder.grid_dim
            grid = [(x, y, z) for x in range(nx) for y in range(ny) for z in range(nz)]
            threads = [threading.Thread(target=run, args=(idx,)) for idx in grid]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if failed:
                raise failed[0]

        # the interpreter binds a launch's arguments by the signature and keeps the constexpr-annotated ones as are
        launch.__signature__, launch.__annotations__ = inspect.signature(program), program.__annotations__
        return launch

    builder_type, switch = type(builder), sys.getswitchinterval()
    builder_type.grid_idx = property(lambda self: getattr(local, "idx", None), lambda self, v: setattr(local, "idx", v))
    cache.update({fn: at_once(program) for fn, program in programs.items()})
    sys.setswitchinterval(1e-4)
    try:
        yield
    finally:
        sys.setswitchinterval(switch)
        cache.update(programs)
        del builder_type.grid_idx


@interp
def test_fast_model_folded_step_equals_packed():
    # gemv="folded" computes exactly what "packed" computes: in a 2-token prefill (folded GEMVs, pack_act after the
    # torch attention), the host-position step, and the graph step (split attention with combine + pack folded in),
    # over two layers so that the first packs the second's input; every counter ends at zero; also with each
    # kernel's programs run at once (programs_at_once: the last to arrive is any of them). attention="folded" with
    # packed GEMVs (only the attention folded: its launch combines and packs o's input) too. argmax="triton": the
    # greedy tokens of torch's argmax
    from bitnet158.runtime.fast import FastModel, FastPathError, GraphDecoder

    net = tiny_model(layers=2, seed=6).net
    with pytest.raises(FastPathError, match="argmax must be one of"):
        FastModel(net, argmax="cuda")
    folded = (kernels._gemv_packed_kernel, kernels._decode_attention_kernel)
    with torch.inference_mode():
        steps = {}
        runs = (("split", "packed", False), ("split", "folded", False), ("split", "folded", True),
                ("folded", "packed", False), ("folded", "packed", True))  # fmt: skip
        for attention, gemv, at_once in runs:
            fast = FastModel(net, backend="triton", attention=attention, gemv=gemv)
            net.setup_cache(1, 16)
            with programs_at_once(*folded) if at_once else contextlib.nullcontext():
                steps[attention, gemv, at_once] = [
                    fast.logits_last(torch.tensor([[3, 5]]), 0), fast.logits_last(torch.tensor([[7]]), 2),
                    fast.logits_last(torch.tensor([[1]]), torch.tensor([3])), net.cache_k.clone(),
                ]  # fmt: skip
            # the counters exist only where something folded (so the folded attention did run), and end at zero
            assert (fast._counters is not None) == ("folded" in (attention, gemv))
            assert fast._counters is None or not fast._counters.any()
        for run in runs[1:]:
            for a, b in zip(steps[runs[0]], steps[run]):
                assert torch.equal(a, b), run
        tokens = {}
        for argmax in ("torch", "triton"):
            fast = FastModel(net, backend="triton", gemv="folded", argmax=argmax)
            tokens[argmax] = list(GraphDecoder(fast, 16, use_graph=False).generate([3, 1], 3))
        assert fast._pick_counter is not None and not fast._pick_counter.any()
        assert tokens["torch"] == tokens["triton"]
        # sampled with a top-k: kernels.sample draws (one draw a token, from the decoder's stream), seeded
        # and reproducible; top-k 1, or min-p 1 (the top token only), is greedy
        dec = GraphDecoder(fast, 16, use_graph=False)
        sample = dict(temperature=1.5, top_k=5, top_p=0.9, seed=11)
        a = list(dec.generate([3, 1], 4, **sample))
        assert int(dec._rng[1]) == 4 and a == list(dec.generate([3, 1], 4, **sample))
        assert list(dec.generate([3, 1], 3, temperature=1.5, top_k=1, seed=2)) == tokens["torch"]
        assert list(dec.generate([3, 1], 3, temperature=5.0, top_k=8, min_p=1.0, seed=2)) == tokens["torch"]
        draws = {tuple(dec.generate([3, 1], 3, temperature=3.0, top_k=8, seed=s)) for s in range(4)}
        assert len(draws) > 1  # the seed reaches the kernel's stream
        # without a top-k the kernels draw too (the radix select of the top-p cut), from the decoder's stream,
        # reproducibly; min-p 1 alone is greedy. A top-k above kernels.SAMPLE_MAX_K draws with torch's ops, from
        # torch's generator: the kernel's stream is not drawn from
        a = list(dec.generate([3, 1], 3, temperature=3.0, top_p=0.99, seed=5))
        assert int(dec._rng[1]) == 3 and a == list(dec.generate([3, 1], 3, temperature=3.0, top_p=0.99, seed=5))
        assert list(dec.generate([3, 1], 3, temperature=5.0, min_p=1.0, seed=2)) == tokens["torch"]
        big = dict(temperature=3.0, top_k=kernels.SAMPLE_MAX_K + 1, top_p=0.99, seed=5)
        a = list(dec.generate([3, 1], 3, **big))
        assert int(dec._rng[1]) == 0 and a == list(dec.generate([3, 1], 3, **big))


@interp
@pytest.mark.parametrize("relu2,sub_norms", [(True, True), (False, False)])
def test_decode_step_reads_each_weight_byte_once(relu2, sub_norms):
    # benchmarks/traffic.py counts every load of a graph decode step's kernels: each decode variant (the default,
    # the int8 head, plain / folded GEMVs) reads each t2 weight byte and each int8 head byte exactly once, and the
    # KV cache at the filled positions only, all of them (a re-read or a whole-cache read gives the same logits,
    # so only counting sees it). The counter itself sees a second read. Launches: the
    # default's step is ten kernels a layer and five more (embedding, final norm, head, argmax, the state update;
    # no rope gather or mask: the attention kernel reads the tables), the folded attention two fewer a layer
    from bitnet158.runtime.fast import FastModel

    spec = importlib.util.spec_from_file_location("traffic", ROOT / "benchmarks" / "traffic.py")
    traffic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(traffic)
    net = tiny_model(layers=2, seed=6, relu2=relu2, sub_norms=sub_norms).net
    prompt = [3, 5, 7, 1, 9, 2, 4]
    rows = traffic.run(lambda v: FastModel(net, backend="triton", **v.opts), prompt, 8, traffic.VARIANTS)
    assert [r["variant"] for r in rows] == [v.name for v in traffic.VARIANTS]
    for row in rows:
        for kind in ("t2 weights", "int8 head"):
            if kind in row:
                r = row[kind]
                assert r.read == r.distinct == r.size > 0, (row["variant"], kind, r[:3])
        assert row["kv_filled"] and row["kv_positions"][0] == 0 and row["kv_positions"][1] in (6, 7), row["variant"]
    assert "int8 head" in rows[1]
    launches = {r["variant"]: r["launches"] for r in rows}
    default = launches["packed (CUDA default)"]
    triton = sum(c for k, c in default.items() if k.startswith("triton"))
    assert triton == 10 * 2 + 3 and sum(default.values()) == triton + 2, default
    assert not {"torch: index", "torch: arange", "torch: le"} & set(default), default
    assert sum(launches["packed, folded attention"].values()) == sum(default.values()) - 2 * 2

    def argmax_as(launch):  # the default's launches with ``launch`` in place of the argmax kernel
        return {**{k: c for k, c in default.items() if k != "triton: _argmax_kernel"}, launch: 1}

    assert dict(launches["packed, torch's pick"]) == argmax_as("torch: argmax")
    # the sampled step (top-k 50, top-p 0.95): the same launches, kernels.sample in place of the argmax;
    # with torch's ops (argmax="torch") the draw is some 40 small ops (runtime/sampling.py's top_k_top_p_filter:
    # no sort of the vocabulary)
    sampled = traffic.step_traffic(FastModel(net, backend="triton"), prompt, 8, sampled=True)["launches"]
    assert dict(sampled) == argmax_as("triton: _sample_kernel"), sampled
    ops = traffic.step_traffic(FastModel(net, backend="triton", argmax="torch"), prompt, 8, sampled=True)["launches"]
    assert ops["torch: topk"] == 1 and "torch: sort" not in ops and sum(ops.values()) > sum(default.values()) + 30, ops
    x, packed, scale = rand_case(1, 24, 64, per_row=True)
    with traffic.counted_loads() as loads:
        for _ in range(2):
            kernels.bitlinear_gemv(x, packed, scale, 64)
    twice = traffic.reads_of(traffic.by_size(loads), [packed])
    assert twice.read == 2 * twice.distinct == 2 * packed.numel() and twice.mask.all()


@interp
def test_fast_model_int8_head_kernel_with_the_final_norm():
    # the triton backend's int8 head applies the final norm in its kernel: the same logits as the torch int8
    # arithmetic on the normed hidden state (the reference backend's)
    from bitnet158.runtime.fast import FastModel

    net = tiny_model(layers=1, seed=7).net
    ids = [2, 7]
    with torch.inference_mode():
        got = {}
        for backend in ("reference", "triton"):
            fast = FastModel(net, head="int8", backend=backend)
            net.setup_cache(1, 16)
            got[backend] = fast.logits(torch.tensor([ids]), 0, last_only=False)[0]
    torch.testing.assert_close(got["triton"], got["reference"], rtol=1e-4, atol=1e-4)


@interp
def test_int8_head_logits_close_to_float_head():
    from bitnet158.runtime.fast import FastModel

    model = tiny_model(seed=1)
    ids = [2, 7, 1, 8, 28]
    with torch.inference_mode():
        ref = _ref_last_logits(model.net, ids)
        fast = FastModel(model.net, head="int8", backend="reference")
        fast.net.setup_cache(1, 64)
        got = fast.logits_last(torch.tensor([ids]), 0)[0]
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel  # quantized, so not equal, but close


# --- on a CUDA device -----------------------------------------------------------------------------------------
SHAPES_2B = [(640, 2560), (2560, 2560), (3840, 2560), (13824, 2560), (2560, 6912)]  # k/v, q/o, qkv, gate|up, down


GPU_CASES = [(m, n, k) for n, k in SHAPES_2B for m in (1, 17)] + [(3, 37, 320), (3, 33, 290), (512, 640, 2560), (512, 2560, 2560)]


@gpu
@needs_cuda
@pytest.mark.parametrize("M,N,K", GPU_CASES)
def test_gpu_bitlinear_exact(M, N, K):
    for dtype, per_row in ((torch.bfloat16, False), (torch.float32, True)):
        x, packed, scale = rand_case(M, N, K, per_row=per_row, dtype=dtype, seed=N + K + M)
        ref = ref_y(x, packed, scale, K)
        if M <= kernels.GEMV_MAX_M and kernels.gemv_compatible(packed):
            assert_out(kernels.bitlinear_gemv(x, packed, scale, K), ref)
        assert_out(kernels.bitlinear_matmul(x, packed, scale, K), ref)
        assert_out(kernels.bitlinear_matmul(x, packed, scale, K, int8_dot=False), ref)
        assert_out(kernels.bitlinear_triton(x, packed, scale, K), ref)


@gpu
@needs_cuda
def test_gpu_norm_kernels_bf16():
    g = torch.Generator().manual_seed(6)
    x, res = torch.randn(2, 1, 2560, generator=g), torch.randn(2, 1, 2560, generator=g) * 5
    w, wi = 1 + 0.1 * torch.randn(2560, generator=g), 1 + 0.1 * torch.randn(6912, generator=g)
    gu = torch.randn(2, 1, 2 * 6912, generator=g)
    x, res, w, wi, gu = (t.cuda().bfloat16() for t in (x, res, w, wi, gu))
    n_ref, h_ref, hn_ref, z_ref = _norm_refs(x, res, w, gu, wi)
    h, hn = kernels.rmsnorm(x, w, 1e-5, residual=res)
    assert torch.equal(h, h_ref)
    for got, want in ((kernels.rmsnorm(x, w, 1e-5), n_ref), (hn, hn_ref), (kernels.act_mul_norm(gu, wi, 1e-5, True), z_ref)):
        # fp32 statistics summed in another order: at most one bf16 ulp apart, and rarely
        diff = (got.float() - want.float()).abs()
        assert bool((diff <= want.float().abs() * 2**-7 + 1e-6).all())
        assert float((diff > 0).float().mean()) < 0.02


@gpu
@needs_cuda
def test_gpu_quantize_and_head_exact():
    x = torch.randn(5, 2560, device="cuda", dtype=torch.bfloat16) * 4
    q, s = kernels.quantize_act(x)
    qr, sr = quantize_activations(x)
    assert torch.equal(q, qr) and torch.equal(s, sr[:, 0])
    w = torch.randn(1000, 2560, device="cuda", dtype=torch.bfloat16)
    wq, ws = quantize_head(w)
    ref = (q.double() @ wq.double().T).float() * ws / sr
    assert torch.equal(kernels.head_int8(x, wq, ws), ref)
    assert torch.equal(int8_head_logits(x, wq, ws), ref)  # float64 on CUDA


@gpu
@needs_cuda
@pytest.mark.parametrize("pdl", [False, True, "early"])
def test_gpu_argmax_ties_at_the_vocabulary_size(pdl):
    # Triton's interpreter always breaks a tie to the left (np.nanargmax), whatever tie_break_left says, so only a
    # GPU checks that the greedy pick takes the first maximal id within a program and across the 32 programs of
    # 128,256 bf16 logits (block 4,096), as torch.argmax does. Each case has ties in both places
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    x = torch.randn(128256, device="cuda").bfloat16()
    for ties, first in (([5000, 4100, 120000], 4100), ([127000, 60000, 60001], 60000), ([4095, 4096, 0], 0)):
        y = x.clone()
        y[ties] = 8.0
        assert int(kernels.argmax(y, counter, pdl=pdl)) == first == int(y.argmax())
        assert int(kernels.argmax(y, counter, block=16, pdl=pdl)) == first  # 8,016 programs
        assert not counter.any()
    zeros = torch.zeros(128256, device="cuda", dtype=torch.bfloat16)
    assert int(kernels.argmax(zeros, counter, pdl=pdl)) == 0



@gpu
@needs_cuda
def test_gpu_decode_attention_bf16():
    # on the GPU the casts round to nearest even like torch: the cache gets the same bf16 bytes. 300 slots: one
    # 64-key block a split; 2,100 slots: three blocks a split, pipelined (PIPE), as the unsplit form always is
    for split, slots, pos in ((False, 300, 257), (True, 300, 257), (True, 2100, 1900)):
        case = _attention_case(torch.bfloat16, 20, 5, 128, slots, pos)
        want, k2, v2 = _attention_ref(*case, 20, 5, 128)
        got = kernels.decode_attention(*case, 20, 5, 128, split=split)
        for name, a, b in (("k", case[4], k2), ("v", case[5], v2)):  # which slots differ, and by how much
            assert torch.equal(a, b), (split, slots, pos, name, (a != b).nonzero()[:, 2].unique().tolist()[:8],
                                       float((a.float() - b.float()).abs().max()))  # fmt: skip
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-2)
    # the L2 prefetch of four regions after the attention or before its wait (the compiled inline PTX) changes nothing
    regions = [torch.ones(n, dtype=torch.uint8, device="cuda") for n in (1, 4096 * 1000 + 5, 3_000_000, 640)]
    for early in (False, True):
        assert torch.equal(kernels.decode_attention(*case, 20, 5, 128, split=True, prefetch=regions, prefetch_early=early), got)


@gpu
@needs_cuda
@pytest.mark.parametrize("compile", [False, True])
def test_gpu_graph_decoder_matches_eager(compile):
    from bitnet158.runtime.fast import FastModel, GraphDecoder
    from bitnet158.runtime.generate import generate_tokens
    from bitnet158.runtime.sampling import Sampler, SamplingParams

    model = tiny_model(device="cuda", dtype=torch.bfloat16)
    ids = [3, 14, 15, 9, 26]
    # conftest disables dynamo for transformers' sake; this test is about compiling, so switch it back on
    with torch._dynamo.config.patch(disable=False), torch.inference_mode():
        ref_tokens = list(generate_tokens(model.net, ids, 12, Sampler(SamplingParams())))
        ref = _ref_last_logits(model.net, ids)
        # torch attention: the eager step (host positions) runs it too, so graph and eager are the same function
        fast = FastModel(model.net, backend="triton_op" if compile else "triton", attention="torch")
        dec = GraphDecoder(fast, 64, compile=compile)
        torch.testing.assert_close(dec.prefill(ids), ref, rtol=2e-2, atol=2e-2)
        got = list(dec.generate(ids, 12))
        # the graph replays exactly the eager static-shape step ...
        assert got == list(GraphDecoder(fast, 64, use_graph=False, compile=compile).generate(ids, 12))
        # ... and follows the reference (bf16 attention kernels differ between the two paths: allow a late flip)
        assert got[:6] == ref_tokens[:6]
        # sampling: this decoder's first sampled generation captures its graph in GraphDecoder.warm_up, before the
        # seed, so it draws what the next one with the same seed draws, and what the eager step draws (the graph's
        # random numbers come from the generator's offset at each replay, as the eager kernel's do)
        sample = dict(temperature=0.9, top_k=20, top_p=0.95, min_p=0.05, seed=3)
        a = list(dec.generate(ids, 8, **sample))
        assert a == list(dec.generate(ids, 8, **sample))
        assert a == list(GraphDecoder(fast, 64, use_graph=False, compile=compile).generate(ids, 8, **sample))
        # the repetition penalty's mask inside the graph: as the eager step
        eager = GraphDecoder(fast, 64, use_graph=False, compile=compile)
        assert list(dec.generate(ids, 8, repetition_penalty=1.3)) == list(eager.generate(ids, 8, repetition_penalty=1.3))
        # reuse (a chat's next turn): the graph decoder and the eager one each run only the new tokens
        longer = ids + got[:8] + [1 if got[8] != 1 else 2]  # differs from the ninth id, which the cache holds
        for d in (dec, eager):
            list(d.generate(ids, 12))
        stats = GenerationStats()
        assert list(dec.generate(longer, 8, reuse=True, stats=stats)) == list(eager.generate(longer, 8, reuse=True))
        assert stats.cached_tokens == len(ids) + 8
        # a bigger decoder over the grown cache (a chat outgrowing it) adopts what it holds: its first generation
        # captures a graph, whose eager steps write past the held ids, and reuses them as the eager decoder does
        held = dec.context()
        outs = []
        for use_graph in (True, False):
            big = GraphDecoder(fast, 128, use_graph=use_graph, compile=compile)
            big.adopt(held)
            outs.append(list(big.generate(held + [3], 8, reuse=True, stats=stats)))
            assert stats.cached_tokens == len(held)
        assert outs[0] == outs[1]


@gpu
@needs_cuda
@pytest.mark.parametrize("N,K", [(3840, 2560), (2560, 6912), (37, 320)])
def test_gpu_packed_gemv(N, K):
    # the input quantization does not depend on the tile: the packed GEMV equals the plain one and the reference
    # bit for bit; with a norm the two kernels reduce the statistics in other orders, so rarely one q step
    for dtype in (torch.bfloat16, torch.float32):
        x, packed, scale, w, gu, res = _layer_case(2, N, K, dtype, seed=N + K)
        want = ref_y(x, packed, scale, K)
        assert_out(kernels.bitlinear_gemv_packed(kernels.pack_act(x, K), packed, scale, dtype), want)
        chain = res + kernels.bitlinear_gemv(kernels.act_mul_norm(gu, w, 1e-5, relu2=True), packed, scale, K)
        a = kernels.pack_act(gu, K, act="relu2", norm=w, eps=1e-5)
        got = kernels.bitlinear_gemv_packed(a, packed, scale, dtype, residual=res)
        torch.testing.assert_close(got.float(), chain.float(), rtol=2e-2, atol=2e-2 * float(chain.float().abs().max()))


@gpu
@needs_cuda
def test_gpu_folded_kernels_and_argmax_in_a_graph():
    # the folded producers (atomic counters, the last program reads what the others wrote) and the argmax, at the
    # 2B-4T shapes, replayed from one CUDA graph over fresh inputs: each replay bit for bit what the separate
    # kernels give. A missing barrier or acquire shows up here as a replay that differs (METHOD.md: a race).
    torch.manual_seed(0)
    d, inter, heads, kv, dh = 2560, 6912, 20, 5, 128
    w_o, w_gu = (torch.randint(0, 256, (n, k // 4), device="cuda", dtype=torch.uint8) & 0x66 for n, k in ((d, d), (2 * inter, d)))
    sc_o, sc_gu = torch.rand(1, device="cuda") + 0.5, torch.rand(2 * inter, device="cuda") + 0.5
    n_mlp, n_sub = ((1 + 0.1 * torch.randn(n, device="cuda")).bfloat16() for n in (d, inter))
    x = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
    case = list(_attention_case(torch.bfloat16, heads, kv, dh, 1024, 700))
    logits = torch.randn(128256, device="cuda")
    counters = torch.zeros(3, heads + 1, dtype=torch.int32, device="cuda")

    def folded():
        _, a_o = kernels.decode_attention(*case, heads, kv, dh, split=True, pack_next=kernels.NextPack(counters[0], n_mlp, 1e-5))
        h, a_gu = kernels.bitlinear_gemv_packed(kernels.pack_act(x, d), w_o, sc_o, x.dtype, residual=res,
                                                pack_next=kernels.NextPack(counters[1], n_mlp, 1e-5))  # fmt: skip
        gu, a_d = kernels.bitlinear_gemv_packed(a_gu, w_gu, sc_gu, x.dtype, pack_next=kernels.NextPack(counters[2], n_sub, 1e-5, "relu2"))
        return a_o, h, a_gu, gu, a_d, kernels.argmax(logits, counters[2, -1:])

    def separate():
        y = kernels.decode_attention(*case, heads, kv, dh, split=True)
        h = kernels.bitlinear_gemv_packed(kernels.pack_act(x, d), w_o, sc_o, x.dtype, residual=res)
        gu = kernels.bitlinear_gemv_packed(kernels.pack_act(h, d, norm=n_mlp, eps=1e-5), w_gu, sc_gu, x.dtype)
        return (kernels.pack_act(y.view(1, -1), d, norm=n_mlp, eps=1e-5), h, kernels.pack_act(h, d, norm=n_mlp, eps=1e-5),
                gu, kernels.pack_act(gu, inter, norm=n_sub, eps=1e-5, act="relu2"), logits.argmax(-1, keepdim=True))  # fmt: skip

    with torch.inference_mode():
        folded()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = folded()
        for rep in range(20):
            for t in (x, res, case[0], logits):
                t.copy_(torch.randn_like(t, dtype=torch.float32).to(t.dtype))
            logits[rep * 977] = 99.0  # a known maximum, and a tie behind it
            logits[rep * 977 + 5000] = 99.0
            graph.replay()
            want = separate()
            for got, ref in zip(out, want):
                same = _same_pack(got, ref) if isinstance(got, kernels.PackedAct) else torch.equal(got, ref)
                assert same, rep
            assert int(out[-1]) == rep * 977
        assert not counters.any()


@gpu
@needs_cuda
def test_gpu_search_tiles_times_the_decode_step(monkeypatch, tmp_path):
    # GraphDecoder.search_tiles on a GPU: every site's step timed at every tile given (CUDA graphs of the whole
    # step), then at every pack warp count given, the fastest kept, the state back where it was. With the packs
    # at their default warps (4 at these widths) the graph step then runs those tiles and decodes exactly what
    # the same step with the autotuner's tiles (the fixed tile under BITNET158_AUTOTUNE=0) decodes; with searched
    # warps (which may move a rounding of the norms' sums) it decodes what the same step run eagerly decodes, with
    # torch's attention on both sides (the attention kernel runs only in the tensor-position step of the graph)
    from bitnet158.runtime.fast import SITES, FastModel, GraphDecoder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the picks' file: not the user's
    net = tiny_model(device="cuda", dtype=torch.bfloat16, seed=8, hidden=512, inter=1376, layers=3).net
    configs = [(16, 128, 4), (8, 64, 4), (4, 256, 4)]
    ids = [3, 14, 15, 9, 26]
    with torch.inference_mode():
        fast = FastModel(net, backend="triton")
        dec = GraphDecoder(fast, 200)
        pick = dec.search_tiles(configs=configs, pack_warps=(4,))
        assert set(pick) == set(SITES) and all(p in configs for p in pick.values())
        for s in SITES:
            assert set(fast.tile_times[s]) == set(configs) and min(fast.tile_times[s].values()) > 0
            assert fast.tile_times[s][pick[s]] == min(fast.tile_times[s].values())
        assert fast.pack_pick == dict.fromkeys(SITES, 4)
        assert int(dec._pos) == 0 and int(dec._n) == 0 and not dec._out.any()
        got = list(dec.generate(ids, 10))
        assert fast.tile_pick is pick  # the capture kept it
        fast.tiles = "autotune"
        want = list(GraphDecoder(fast, 200).generate(ids, 10))
        assert got == want
        fast.tiles, fast.tile_pick, fast.attention = "searched", None, "torch"
        dec = GraphDecoder(fast, 200)
        dec.search_tiles(configs=configs, pack_warps=(4, 8, 16))
        for s in SITES:
            times = fast.pack_times[s]
            assert set(times) == {4, 8, 16} and min(times.values()) > 0 and times[fast.pack_pick[s]] == min(times.values())
        got = list(dec.generate(ids, 10))
        assert got == list(GraphDecoder(fast, 200, use_graph=False).generate(ids, 10))


@gpu
@needs_cuda
def test_gpu_decode_variants_follow_the_default():
    # every FastModel decode variant (attention kernel, plain / packed / folded GEMVs, PDL, int8 head) runs in a CUDA graph; the
    # bf16-head ones give the first graph step's greedy tokens (torch attention, plain GEMVs), and without the
    # attention kernel (which only the tensor-position step uses) the graph replays what the step computes eagerly
    from bitnet158.runtime.fast import FastModel, GraphDecoder

    model = tiny_model(device="cuda", dtype=torch.bfloat16, seed=8)
    ids = [3, 14, 15, 9, 26]
    with torch.inference_mode():
        fast = FastModel(model.net, backend="triton", attention="torch", gemv="plain", pdl=False)  # the first graph step
        want = list(GraphDecoder(fast, 64).generate(ids, 10))
        assert want == list(GraphDecoder(fast, 64, use_graph=False).generate(ids, 10))
        default = list(GraphDecoder(FastModel(model.net, backend="triton"), 64).generate(ids, 10))
        assert default[:6] == want[:6]
        # the L2 prefetch changes no value: the default's tokens exactly
        for prefetch in ("after", "before"):
            assert list(GraphDecoder(FastModel(model.net, backend="triton", prefetch=prefetch), 64).generate(ids, 10)) == default
        # nor does PDL's early trigger, in every kernel or in the packs and combines only (the same kernels launched
        # earlier): greedy, and sampled with each draw (the top-p radix select, the top-k kernel), each kernel of the
        # step once with the trigger
        for head, kw in (("bf16", {}), ("int8", dict(temperature=0.8, top_p=0.9, seed=3)),
                         ("bf16", dict(temperature=0.8, top_k=5, top_p=0.9, seed=3))):  # fmt: skip
            runs = [list(GraphDecoder(FastModel(model.net, backend="triton", head=head, pdl=pdl), 64).generate(ids, 24, **kw))
                    for pdl in (True, "early", "early-packs")]  # fmt: skip
            assert runs[0] == runs[1] == runs[2], (head, kw)
        variants = [("triton", "plain", False, "bf16"), ("split", "plain", False, "bf16"),
                    ("torch", "packed", False, "bf16"), ("triton", "packed", False, "bf16"), ("split", "packed", True, "bf16"),
                    ("torch", "packed", True, "bf16"), ("split", "packed", True, "int8"),
                    ("split", "folded", True, "bf16"), ("torch", "folded", False, "bf16"), ("split", "folded", True, "int8"),
                    ("folded", "packed", True, "bf16")]  # fmt: skip
        for attention, gemv, pdl, head in variants:
            argmax = "triton" if gemv == "folded" else "torch"
            fast = FastModel(model.net, backend="triton", attention=attention, gemv=gemv, pdl=pdl, head=head, argmax=argmax)
            got = list(GraphDecoder(fast, 64).generate(ids, 10))
            if attention == "torch":
                assert got == list(GraphDecoder(fast, 64, use_graph=False).generate(ids, 10)), (attention, gemv, pdl, head)
            if head == "bf16":
                assert got[:6] == want[:6], (attention, gemv, pdl, head)
            if attention == "folded":  # the default's arithmetic, only in fewer launches: its tokens exactly
                assert got == default, (attention, gemv, pdl, head)


@gpu
@needs_cuda
def test_gpu_sample_in_a_graph():
    # kernels.sample over 128,256 logits (32 programs; 126 without a top-k), replayed from one CUDA graph over
    # fresh logits: each replay draws the reference's id and keeps the reference's number of tokens
    # (runtime/sampling.py's filters, the race over the same Philox numbers), and advances the stream. Top-k 50
    # with top-p and min-p, with 100 ties at the top in some replays (past the merged 64); the largest top-k with
    # top-p; top-p alone (the radix select's nine launches), and min-p alone. The filters' sums run in another
    # order than torch's, which may move a cut whose mass lies within rounding of top_p: at most one replay in 20
    # may differ, and never to a token the filters drop.
    torch.manual_seed(0)
    logits = torch.randn(128256, device="cuda")
    t, top_p, min_p = (torch.tensor([v], device="cuda") for v in (0.8, 0.95, 0.01))
    rng = torch.tensor([987654321, 0], device="cuda")
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    with torch.inference_mode():
        for k, tp, mp in ((50, top_p, min_p), (kernels.SAMPLE_MAX_K, top_p, None), (None, top_p, None), (None, None, min_p)):
            rng[1] = 0
            kernels.sample(logits, t, k, tp, mp, rng, counter)  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = kernels.sample(logits, t, k, tp, mp, rng, counter)
            same = 0
            for rep in range(20):
                logits.copy_(torch.randn_like(logits) * (1 + rep % 4))
                if rep % 5 == 0:
                    logits[1000:1100] = logits.max()  # 100 ties at the top
                want, kept = _sample_reference(logits, 0.8, k, None if tp is None else 0.95, None if mp is None else 0.01, rng)
                graph.replay()
                assert kept[int(out[0])] and int(rng[1]) == rep + 2, (k, rep)
                same += int(out[0]) == want and int(out[1]) == int(kept.sum())
            assert same >= 19 and not counter.any(), k
