"""Ternary codecs and absmean ternarization against independent numpy oracles, transformers and golden bytes."""

import numpy as np
import pytest
import torch
from transformers.integrations.bitnet import pack_weights, unpack_weights

from bitnet158.formats.ternary import (
    absmean_ternarize,
    hf_to_t2,
    pack_hf,
    pack_t2,
    scaled_ternary_scale,
    unpack_hf,
    unpack_t2,
)

SHAPES = [(1, 1), (1, 4), (3, 1), (3, 2), (3, 3), (2, 5), (4, 7), (5, 8), (8, 13), (7, 64), (4, 65), (16, 130)]


def random_ternary(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=g, dtype=torch.int8)


# --- oracles: plain loops over numpy, written from PACKED.md §2.1 and REFERENCE §4, not from our code ----------


def oracle_pack_t2(t: np.ndarray) -> np.ndarray:
    out_f, in_f = t.shape
    rb = (in_f + 3) // 4
    packed = np.zeros((out_f, rb), dtype=np.uint8)
    for r in range(out_f):
        for j in range(rb):
            byte = 0
            for k in range(4):
                col = 4 * j + k
                code = int(t[r, col]) + 1 if col < in_f else 1  # padding code 1 = zero
                byte |= code << (2 * k)
            packed[r, j] = byte
    return packed


def oracle_pack_hf(t: np.ndarray) -> np.ndarray:
    out_f, in_f = t.shape
    rows = out_f // 4
    packed = np.zeros((rows, in_f), dtype=np.uint8)
    for r in range(rows):
        for c in range(in_f):
            packed[r, c] = sum((int(t[i * rows + r, c]) + 1) << (2 * i) for i in range(4))
    return packed


def oracle_unpack_hf(packed: np.ndarray) -> np.ndarray:
    rows, in_f = packed.shape
    out = np.zeros((4 * rows, in_f), dtype=np.int8)
    for i in range(4):
        for r in range(rows):
            out[i * rows + r] = ((packed[r] >> (2 * i)) & 3).astype(np.int8) - 1
    return out


# --- t2 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_t2_matches_oracle_and_round_trips(shape):
    t = random_ternary(shape, seed=shape[0] * 1000 + shape[1])
    packed = pack_t2(t)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (shape[0], (shape[1] + 3) // 4)
    np.testing.assert_array_equal(packed.numpy(), oracle_pack_t2(t.numpy()))
    assert torch.equal(unpack_t2(packed, shape[1]), t)
    assert torch.equal(unpack_t2(packed, shape[1], dtype=torch.float32), t.float())
    assert torch.equal(unpack_t2(packed, shape[1], dtype=torch.bfloat16), t.bfloat16())


def test_t2_golden_bytes():
    # Hand-derived: codes are t + 1, weight 4j + k in bits 2k..2k+1, padding codes 1.
    # (a byte's fields written from bit 7 down, so the code of weight 4j is the rightmost pair):
    #   row 0 = [1, 0, -1, 1 | 1, -1, pad, pad]
    #     codes [2,1,0,2] -> 0b10_00_01_10 = 0x86;  codes [2,0,1,1] -> 0b01_01_00_10 = 0x52
    #   row 1 = [-1, -1, 0, 0 | 1, 0, pad, pad]
    #     codes [0,0,1,1] -> 0b01_01_00_00 = 0x50;  codes [2,1,1,1] -> 0b01_01_01_10 = 0x56
    t = torch.tensor([[1, 0, -1, 1, 1, -1], [-1, -1, 0, 0, 1, 0]], dtype=torch.int8)
    packed = pack_t2(t)
    assert bytes(packed.numpy()) == bytes([0x86, 0x52, 0x50, 0x56])
    assert torch.equal(unpack_t2(torch.tensor([[0x86, 0x52], [0x50, 0x56]], dtype=torch.uint8), 6), t)


def test_t2_accepts_any_integer_dtype():
    t = random_ternary((3, 9), seed=1)
    for dtype in (torch.int16, torch.int32, torch.int64):
        assert torch.equal(pack_t2(t.to(dtype)), pack_t2(t))


def test_t2_rejects_bad_input():
    with pytest.raises(ValueError, match="values must be in"):
        pack_t2(torch.tensor([[0, 2]], dtype=torch.int8))
    for dtype in (torch.int16, torch.int32, torch.uint8):  # the wide path checks the range too
        with pytest.raises(ValueError, match=r"values must be in \{-1, 0, 1\}, found min 0 max 2"):
            pack_t2(torch.tensor([[0, 2]], dtype=dtype))
    with pytest.raises(ValueError, match=r"pack_hf: expected a 2-D \[out, in\] tensor, got shape \(4,\)"):
        pack_hf(torch.zeros(4, dtype=torch.int8))
    for bad in (torch.zeros(2, 3, dtype=torch.int8), torch.zeros(6, dtype=torch.uint8)):
        with pytest.raises(ValueError, match=r"unpack_hf: expected uint8 \[R, in\]"):
            unpack_hf(bad)
        with pytest.raises(ValueError, match=r"hf_to_t2: expected uint8 \[R, in\]"):
            hf_to_t2(bad)
    with pytest.raises(ValueError, match="absmean_ternarize: empty tensor"):
        absmean_ternarize(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="integer"):
        pack_t2(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="2-D"):
        pack_t2(torch.zeros(4, dtype=torch.int8))
    with pytest.raises(ValueError, match="bytes per row"):
        unpack_t2(torch.zeros(2, 2, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="uint8"):
        unpack_t2(torch.zeros(2, 2, dtype=torch.int8), 8)


def test_unpack_t2_needs_no_host_values():
    # On the meta device nothing can be read back to the host: this proves unpack is pure tensor ops.
    out = unpack_t2(torch.empty(3, 2, dtype=torch.uint8, device="meta"), 7, dtype=torch.bfloat16)
    assert out.device.type == "meta" and tuple(out.shape) == (3, 7) and out.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_t2_and_hf_on_cuda():
    t = random_ternary((64, 130), seed=7)
    packed = pack_t2(t.cuda())
    assert packed.is_cuda and torch.equal(packed.cpu(), pack_t2(t))
    assert torch.equal(unpack_t2(packed, 130).cpu(), t)
    assert torch.equal(unpack_hf(pack_hf(t.cuda())).cpu(), t)


# --- HF layout -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 1), (4, 5), (8, 3), (12, 16), (32, 7)])
def test_hf_matches_oracle_and_transformers(shape):
    t = random_ternary(shape, seed=shape[0] * 100 + shape[1])
    packed = pack_hf(t)
    assert tuple(packed.shape) == (shape[0] // 4, shape[1])
    np.testing.assert_array_equal(packed.numpy(), oracle_pack_hf(t.numpy()))
    np.testing.assert_array_equal(unpack_hf(packed).numpy(), oracle_unpack_hf(packed.numpy()))
    assert torch.equal(unpack_hf(packed), t)
    # transformers' own codec (pack_weights adds 1 to its input in place: hand it a copy).
    assert torch.equal(packed, pack_weights(t.clone()))
    unpack_eager = getattr(unpack_weights, "_torchdynamo_orig_callable", unpack_weights)
    assert torch.equal(unpack_eager(packed, dtype=torch.int8), t)
    assert torch.equal(unpack_hf(packed, dtype=torch.float32), t.float())


def test_hf_golden_bytes():
    # out = 8, R = 2: packed[r] holds rows r, 2 + r, 4 + r, 6 + r in bits 0-1, 2-3, 4-5, 6-7.
    #   rows 0,2,4,6 = [1,-1,-1,1] -> codes [2,0,0,2] = 0b10_00_00_10 = 0x82
    #   rows 1,3,5,7 = [0,1,-1,0]  -> codes [1,2,0,1] = 0b01_00_10_01 = 0x49
    t = torch.tensor([[1], [0], [-1], [1], [-1], [-1], [1], [0]], dtype=torch.int8)
    packed = pack_hf(t)
    assert packed.tolist() == [[0x82], [0x49]]
    assert torch.equal(unpack_hf(torch.tensor([[0x82], [0x49]], dtype=torch.uint8)), t)


def test_hf_rejects_rows_not_multiple_of_4_and_keeps_input():
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_hf(torch.zeros(6, 3, dtype=torch.int8))
    t = random_ternary((8, 4), seed=3)
    before = t.clone()
    pack_hf(t)
    assert torch.equal(t, before)


def test_t2_and_hf_layouts_decode_alike():
    # The same matrix in both layouts decodes to the same values.
    t = random_ternary((8, 12), seed=11)
    assert torch.equal(unpack_hf(pack_hf(t)), unpack_t2(pack_t2(t), 12))


# --- absmean ternarization -----------------------------------------------------------------------------------


def oracle_absmean(w: np.ndarray):
    w32 = w.astype(np.float32)
    m = np.float32(max(np.float32(np.abs(w32).astype(np.float64).mean()), np.float32(1e-5)))
    t = np.clip(np.round(w32 / m), -1, 1).astype(np.int8)  # np.round is half-to-even too
    return t, m


def test_absmean_ties_round_half_to_even():
    # mean|w| = 8 / 8 = 1 exactly, so w / m is w: 0.5 and -0.5 are ties that go to 0 (even), 1.5 goes to 2 -> 1.
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5], [1.0, 0.5, 1.25, 1.25]])
    t, m = absmean_ternarize(w)
    assert m == 1.0
    assert t.dtype == torch.int8
    assert t.tolist() == [[0, 0, 1, -1], [1, 0, 1, 1]]
    t_np, m_np = oracle_absmean(w.numpy())
    np.testing.assert_array_equal(t.numpy(), t_np)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_absmean_matches_numpy(dtype):
    # Values that are multiples of 1/64 with a power-of-two count: every sum is exact, so the mean is too.
    g = torch.Generator().manual_seed(5)
    w = (torch.randint(-96, 97, (16, 32), generator=g).float() / 64).to(dtype)
    t, m = absmean_ternarize(w)
    t_np, m_np = oracle_absmean(w.float().numpy())
    assert m == float(m_np)
    np.testing.assert_array_equal(t.numpy(), t_np)
    # And on generic random data (mean may differ in the last ulp: compare away from the rounding edges).
    w = torch.randn(64, 48, generator=g).to(dtype)
    t, m = absmean_ternarize(w)
    t_np, m_np = oracle_absmean(w.float().numpy())
    assert abs(m - m_np) <= 1e-6 * m_np
    ratio = np.abs(w.float().numpy() / m_np)
    safe = np.abs(ratio - 0.5) > 1e-4
    np.testing.assert_array_equal(t.numpy()[safe], t_np[safe])


def test_absmean_all_zero_and_tiny():
    t, m = absmean_ternarize(torch.zeros(3, 5))
    assert m == float(np.float32(1e-5)) and not t.any()
    t, m = absmean_ternarize(torch.full((2, 2), 1e-7))  # the 1e-5 floor: w / m = 0.01 -> 0
    assert m == float(np.float32(1e-5)) and not t.any()


def test_absmean_rejects_non_float_and_non_finite():
    with pytest.raises(ValueError):
        absmean_ternarize(torch.zeros(2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="non-finite"):
        absmean_ternarize(torch.tensor([1.0, float("inf")]))


# --- scaled ternary detection --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scaled_ternary_scale_detects_exact_scale(dtype):
    c = torch.tensor(0.0123, dtype=dtype)
    t = random_ternary((6, 10), seed=2)
    w = t.to(dtype) * c
    got = scaled_ternary_scale(w)
    assert got == float(c.float())
    # c · t in float32 reproduces w exactly.
    assert torch.equal((t.float() * torch.tensor(got, dtype=torch.float32)).to(dtype), w)


def test_scaled_ternary_scale_rejects():
    assert scaled_ternary_scale(torch.tensor([0.5, -0.25, 0.0])) is None  # two magnitudes
    assert scaled_ternary_scale(torch.tensor([0.5, 0.5 + 2**-20])) is None  # nearly equal is not equal
    assert scaled_ternary_scale(torch.zeros(4, 4)) is None  # all zero: no unique c
    assert scaled_ternary_scale(torch.tensor([float("nan"), float("nan")])) is None
    assert scaled_ternary_scale(torch.tensor([float("inf"), -float("inf")])) is None
    assert scaled_ternary_scale(torch.tensor([1, -1], dtype=torch.int8)) is None
    assert scaled_ternary_scale(torch.tensor([0.1, -0.1], dtype=torch.float64)) is None  # 0.1 is no float32
    assert scaled_ternary_scale(torch.tensor([0.25, -0.25, 0.0], dtype=torch.float64)) == 0.25
