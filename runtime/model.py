"""The BitNet b1.58 decoder in plain torch: one network for the three families, switched by ModelConfig.

No I/O here: runtime/loader.py builds the modules from a weight source. Shapes use B (batch), T (new tokens),
L (keys in the cache), D (model width), H / Hkv (query / key-value heads), Dh (head dim), V (vocab).

    h   = x + o_proj(sub_norm?(attn(rope(q(n(x))), rope(k(n(x))), v(n(x)))))
    out = h + down(sub_norm?(act(gate(n(h))) · up(n(h))))

with every linear a BitLinear (runtime/bitlinear.py) and act = relu² (Microsoft 2B-4T) or SiLU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bitnet158.formats.config import ModelConfig
from bitnet158.runtime.bitlinear import BitLinear


class RMSNorm(nn.Module):
    """transformers' Llama/BitNet RMSNorm: normalise in fp32, cast back to the input dtype, then × weight."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)  # [D] in the model dtype
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [Dh/2] (fp32) exactly as transformers computes them, with linear / llama3 scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    factor = rs["factor"]
    if rs["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths divided by factor, short ones kept, a smooth blend in between.
    old_len = rs["original_max_position_embeddings"]
    low, high = rs["low_freq_factor"], rs["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX rope pairing: (x1, x2) → (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache(nn.Module):
    """Static preallocated cache for one layer: k, v [B, Hkv, max_seq, Dh], views of the network's stacked caches."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)


def write_kv(cache_k: torch.Tensor, cache_v: torch.Tensor, pos: torch.Tensor | int, k: torch.Tensor, v: torch.Tensor):
    """Write k, v [B, Hkv, T, Dh] into a layer's cache at positions ``pos``; return the keys/values to attend to.

    int pos: slots pos..pos+T-1 are written and the filled prefix [B, Hkv, pos+T, Dh] comes back (eager path).
    tensor pos [T]: index_copy_ into the slots and the whole cache comes back, static shapes (CUDA graphs).
    """
    b, t = k.shape[0], k.shape[2]
    if isinstance(pos, int):
        cache_k[:b, :, pos : pos + t] = k
        cache_v[:b, :, pos : pos + t] = v
        return cache_k[:b, :, : pos + t], cache_v[:b, :, : pos + t]
    cache_k[:b].index_copy_(2, pos, k)
    cache_v[:b].index_copy_(2, pos, v)
    return cache_k[:b], cache_v[:b]


def attend(q, k, v, cos, sin, pos, mask, cache_k, cache_v, n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """Rope, KV-cache write and causal attention of projected q [B, T, H·Dh], k/v [B, T, Hkv·Dh] →
    [B, T, H·Dh] (before the sub-norm). A free function so that the fast paths (runtime/fast.py, runtime/cpu.py)
    run exactly this with their fused projections."""
    b, t, _ = q.shape
    q = q.reshape(b, t, n_heads, head_dim).transpose(1, 2)  # [B, H, T, Dh]
    k = k.reshape(b, t, n_kv, head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
    v = v.reshape(b, t, n_kv, head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k, v = write_kv(cache_k, cache_v, pos, k, v)  # [B, Hkv, L, Dh]
    # A prompt from position 0 (L = T) has the plain causal mask: is_causal applies it without reading a mask, and
    # the CPU flash kernel then skips the masked half (2× at 2,048 tokens), the same values.
    causal = mask is not None and isinstance(pos, int) and pos == 0
    # Query head h reads kv head h // (H / Hkv), as transformers' repeat_kv does. A bool by a branch: should
    # torch.compile make the head counts symbolic, n_kv != n_heads is a SymBool, which SDPA refuses; a branch on it
    # specialises (a guard) and leaves a bool
    gqa = True if n_kv != n_heads else False
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if causal else mask, is_causal=causal, scale=head_dim**-0.5, enable_gqa=gqa,
    )  # [B, H, T, Dh]
    return y.transpose(1, 2).reshape(b, t, n_heads * head_dim)  # [B, T, H·Dh]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, q, k, v, o, sub_norm: RMSNorm | None):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q, k, v, o
        self.sub_norm = sub_norm
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, pos, mask):
        # x [B, T, D]; cos/sin [T, Dh]; mask: None (attend to every cached key) or bool [T, L]
        y = self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, pos, mask)
        if self.sub_norm is not None:
            y = self.sub_norm(y)
        return self.o_proj(y)  # [B, T, D]

    def attend(self, q, k, v, cos, sin, pos, mask):
        """``attend`` on this layer's cache: q [B, T, H·Dh], k/v [B, T, Hkv·Dh] → [B, T, H·Dh]."""
        c = self.cache
        return attend(q, k, v, cos, sin, pos, mask, c.k, c.v, self.n_heads, self.n_kv, self.head_dim)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, gate, up, down, sub_norm: RMSNorm | None):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        self.sub_norm = sub_norm
        self.relu2 = config.hidden_act == "relu2"

    def forward(self, x):
        # x [B, T, D] → [B, T, I] → [B, T, D]
        g = self.gate_proj(x)
        g = torch.square(F.relu(g)) if self.relu2 else F.silu(g)
        h = g * self.up_proj(x)
        if self.sub_norm is not None:
            h = self.sub_norm(h)
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, attn_norm: RMSNorm, attn: Attention, mlp_norm: RMSNorm, mlp: MLP):
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp

    def forward(self, x, cos, sin, pos, mask):
        h = x + self.attn(self.attn_norm(x), cos, sin, pos, mask)
        return h + self.mlp(self.mlp_norm(h))


# Rows of a head stored narrower than the activations that head_logits upcasts at a time: 8192 · D fp32 values,
# 84 MB at D = 2560, instead of a whole fp32 copy of the head (1.3 GB at 2B-4T).
HEAD_CHUNK = 8192


class Transformer(nn.Module):
    """Embedding → blocks → norm → head. ``forward(tokens [B, T], start_pos)`` returns fp32 logits [B, T, V].

    ``dtype`` is the compute dtype (default: the embedding's). The embedding and head may be stored narrower than
    it: the loader keeps them bf16 under fp32 compute on the compiled CPU path when that is exact, half the bytes.
    Their rows are then upcast where they are used, so the products are the same."""

    def __init__(
        self,
        config: ModelConfig,
        embed: torch.Tensor,
        blocks: list[Block],
        norm: RMSNorm,
        head: torch.Tensor,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.config = config
        self._dtype = dtype or embed.dtype
        self.register_buffer("embed", embed, persistent=False)  # [V, D]
        self.layers = nn.ModuleList(blocks)
        self.norm = norm
        # A tied head is the same tensor object as the embedding: no second copy in memory.
        self.register_buffer("head", head, persistent=False)  # [V, D]
        inv_freq = rope_inv_freq(config)  # [Dh/2]
        self.register_buffer("inv_freq", inv_freq.to(embed.device), persistent=False)
        self.max_seq = 0
        self.max_batch = 0
        # every layer's cache in one tensor [L, B, Hkv, max_seq, Dh] each (setup_cache): the layers hold views, so
        # growing the cache is one copy, and a check or a benchmark sees every layer's cache at once
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: activations, the KV cache, rope tables."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.inference_mode()
    def setup_cache(self, max_batch: int, max_seq: int) -> None:
        """(Re)allocate the KV caches and rope tables for ``max_seq`` positions if the current ones are smaller.
        A grown cache keeps what the old one held (a chat's earlier turns, GraphDecoder.adopt)."""
        if max_seq > self.config.max_position_embeddings:
            raise ValueError(
                f"a cache of {max_seq} positions exceeds the model context {self.config.max_position_embeddings}"
            )
        if max_batch <= self.max_batch and max_seq <= self.max_seq:
            return
        max_batch, max_seq = max(max_batch, self.max_batch), max(max_seq, self.max_seq)
        c = self.config
        for layer in self.layers:
            layer.attn.cache = None
        old_k, old_v = self.cache_k, self.cache_v
        shape = (len(self.layers), max_batch, c.num_key_value_heads, max_seq, c.head_dim)
        self.cache_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.cache_v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if old_k is not None:  # [L, B, Hkv, S, Dh] into the first B rows and S positions
            b, s = old_k.shape[1], old_k.shape[3]
            self.cache_k[:, :b, :, :s] = old_k
            self.cache_v[:, :b, :, :s] = old_v
            del old_k, old_v
        for i, layer in enumerate(self.layers):
            layer.attn.cache = KVCache(self.cache_k[i], self.cache_v[i])
        # cos/sin [max_seq, Dh] computed in fp32 as transformers does (position · inv_freq), cast at use.
        freqs = torch.arange(max_seq, device=self.device).float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(self.dtype), persistent=False)
        self.register_buffer("sin", emb.sin().to(self.dtype), persistent=False)
        self.max_batch, self.max_seq = max_batch, max_seq

    @torch.inference_mode()  # the cache holds inference tensors: every write to it must be in inference mode
    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """Run tokens [B, T] at positions start_pos.. and write their keys/values into the cache.

        ``start_pos`` int: eager path, attends to the cache prefix [0, start_pos + T).
        ``start_pos`` tensor [T] of positions: static-shape path for CUDA-graph decode, attends over the whole
        cache with a mask (slots past the positions are masked out).
        """
        b, t = tokens.shape
        if isinstance(start_pos, int):
            if start_pos + t > self.max_seq or b > self.max_batch:
                raise ValueError(
                    f"positions up to {start_pos + t} / batch {b} exceed the cache ({self.max_seq} / {self.max_batch});"
                    " call setup_cache first"
                )
            cos, sin = self.cos[start_pos : start_pos + t], self.sin[start_pos : start_pos + t]  # [T, Dh]
            if t == 1:
                mask = None  # one new token sees every cached key
            else:
                # query i (absolute position start_pos + i) sees keys 0 .. start_pos + i
                keys = torch.arange(start_pos + t, device=tokens.device)
                mask = keys[None, :] <= (start_pos + torch.arange(t, device=tokens.device))[:, None]  # [T, L]
        else:
            pos = start_pos  # [T] int64 on the device
            cos, sin = self.cos[pos], self.sin[pos]
            mask = torch.arange(self.max_seq, device=tokens.device)[None, :] <= pos[:, None]  # [T, max_seq]
        x = self.embed_tokens(tokens)  # [B, T, D]
        for layer in self.layers:
            x = layer(x, cos, sin, start_pos, mask)
        return self.head_logits(self.norm(x))  # [B, T, V]

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding rows of tokens [...] in the compute dtype [..., D]: always a new tensor, never a view."""
        return F.embedding(tokens, self.embed).to(self.dtype)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits [..., V] of the normed hidden states x [..., D]."""
        if self.head.dtype == x.dtype:
            return F.linear(x, self.head).float()
        # a head stored narrower than x: upcast HEAD_CHUNK rows at a time (exact), never the whole head at once
        return torch.cat([F.linear(x, w.to(x.dtype)) for w in self.head.split(HEAD_CHUNK)], -1).float()

    def resident_weight_bytes(self) -> int:
        """Bytes of weights on the device: packed ternary (+ unpacked caches), norms, embedding and head."""
        n = sum(m.resident_bytes() for m in self.modules() if isinstance(m, BitLinear))
        # named_buffers() lists a tied head once (same tensor object as the embedding).
        for name, buf in self.named_buffers():
            if name.split(".")[-1] in ("packed", "scale", "k", "v", "cos", "sin", "inv_freq"):
                continue
            n += buf.numel() * buf.element_size()
        return n
