"""Build a runnable model from a weight source: a packed file or a GGUF, through the same read surface.

The source is memory-mapped. Ternary weights go to the device as their packed bytes (a copy of the uint8 mmap view,
never unpacked on the host); floats are cast to the compute dtype on their way to the device. Every tensor name and
shape is checked against the config before anything is built, and the source is closed at the end: the model owns
copies of everything it needs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict

import torch

from bitnet158.formats.config import ModelConfig
from bitnet158.formats.packed import model_tensors, tensor_table_error
from bitnet158.runtime.api import BitNetModel
from bitnet158.runtime.bitlinear import BitLinear, get_backend
from bitnet158.runtime.fast import HEADS, FastModel
from bitnet158.runtime.model import MLP, Attention, Block, RMSNorm, Transformer
from bitnet158.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "f16": torch.float16, "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "f32": torch.float32, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}  # fmt: skip


class LoadError(ValueError):
    """The weight source does not describe a model we can build (missing tensor, wrong shape...)."""


class DeviceError(ValueError):
    """The requested device or dtype is unavailable or unsafe for this model."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None → CUDA when available, else CPU. An explicit CUDA request without CUDA is an error, never a fallback."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from e
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceError(f"unsupported device {device!r} (use cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {device!r} requested but no CUDA device is available (torch.cuda.is_available() is False)"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def resolve_dtype(
    dtype: str | torch.dtype | None, device: torch.device, config: ModelConfig, force: bool
) -> torch.dtype:
    """None → bf16 on CUDA, fp32 on CPU. fp16 with relu² is refused unless ``force`` (relu² overflows fp16)."""
    if dtype is None:
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, torch.dtype):
        dt = dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        dt = _DTYPES[dtype.lower()]
    else:
        raise DeviceError(f"unknown dtype {dtype!r} (use bf16, f16 or f32)")
    if dt not in (torch.bfloat16, torch.float16, torch.float32):
        raise DeviceError(f"unsupported dtype {dt} (use bf16, f16 or f32)")
    if dt == torch.float16 and config.hidden_act == "relu2" and not force:
        raise DeviceError(
            "fp16 with relu² activations overflows (the squared gate exceeds 65504); use bf16 or f32, or force it"
        )
    return dt


def _check_tensors(source, config: ModelConfig) -> None:
    why = tensor_table_error(asdict(config), source.tensors)
    if why is not None:
        raise LoadError(why)


# Below this many ternary weights the CPU default stays on the reference path: compiling costs a few seconds per
# run (less once torch's cache holds the kernels), more than it saves on a small model's decode.
CPU_COMPILE_MIN_WEIGHTS = 100_000_000


def fast_backend(
    device: torch.device, reference: bool, head: str, backend: str | None, compile_cpu: bool | None = None,
    ternary_weights: int = 0,
) -> str | None:  # fmt: skip
    """The fast path's backend, or None for the plain network. CUDA: "triton" when triton imports. CPU: "cpu"
    (runtime/cpu.py) when ``compile_cpu`` is True, or None and the model has at least CPU_COMPILE_MIN_WEIGHTS
    ternary weights, and torch.compile can build kernels here. Else a log line and the reference path. Never
    when ``reference`` or an explicit ``backend`` is asked for. ``head="int8"`` needs a fast path: on the CPU it
    turns compiling on unless ``compile_cpu`` is False."""
    if head not in HEADS:
        raise DeviceError(f"unknown head {head!r} (use {' or '.join(HEADS)})")
    if compile_cpu is None:
        compile_cpu = head == "int8" or ternary_weights >= CPU_COMPILE_MIN_WEIGHTS
    fast, missing = None, None  # missing: why a fast path that was due cannot run
    if reference or backend is not None:
        why = "the reference path was asked for"
    elif device.type != "cuda" and not compile_cpu:
        why = "compiling is off (--no-compile)"
    elif device.type == "cuda":
        try:
            get_backend("triton")
            fast = "triton"
        except ImportError as e:
            why = missing = f"the triton fast path is unavailable ({e})"
    else:
        from bitnet158.runtime.cpu import unavailable_reason

        reason = unavailable_reason()
        if reason is None:
            fast = "cpu"
        else:
            why = missing = f"the compiled CPU path is unavailable ({reason})"
    if fast is None and head != "bf16":
        raise DeviceError(f"head {head!r} needs a fast path (CUDA with triton, or the compiled CPU path), but {why}")
    if missing:
        log.warning("%s; running the reference path", missing)
    return fast


def narrow_dtype(t: torch.Tensor) -> torch.dtype:
    """The 16-bit dtype that holds float tensor ``t`` exactly: its own when it has 16 bits, else bf16 when every value
    survives the round trip (an f32 file converted from bf16 masters), else f32. Checked a slice of rows at a time:
    no full-size temporary."""
    if t.element_size() == 2:
        return t.dtype
    exact = all(torch.equal(c.to(torch.bfloat16).to(t.dtype), c) for c in t.split(8192))
    return torch.bfloat16 if exact else torch.float32


def build_model(
    source,
    *,
    device=None,
    dtype=None,
    cache_unpacked: bool = False,
    force: bool = False,
    backend: str | None = None,
    reference: bool = False,
    head: str = "bf16",
    compile_cpu: bool | None = None,
):
    """Build a BitNetModel from an open weight source (``.config``, ``.tokenizer``, ``.tensors``, ``.torch``,
    ``.ternary``). The caller closes the source; nothing built here points into it.

    The fast path is the default: on CUDA triton BitLinears, fused projections, CUDA-graph decode; on the CPU the
    compiled decode step of runtime/cpu.py (``compile_cpu``: None = for models of at least
    CPU_COMPILE_MIN_WEIGHTS ternary weights, or with the int8 head; True / False = always / never). ``head``: bf16
    or int8 (either fast path). ``reference=True`` or an explicit ``backend`` keeps the plain network."""
    config = ModelConfig.from_dict(source.config)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, config, force)
    if backend is not None:
        get_backend(backend)  # an unknown backend fails before minutes of loading
    ternary = [shape for shape, is_ternary in model_tensors(asdict(config)).values() if is_ternary]
    fast = fast_backend(dev, reference, head, backend, compile_cpu, sum(math.prod(s) for s in ternary))
    if fast == "cpu":
        from bitnet158.runtime.cpu import MAX_K

        if max(s[1] for s in ternary) > MAX_K:
            log.warning("a linear has more than %d inputs, beyond the compiled CPU path; running the reference", MAX_K)
            fast = None
    if cache_unpacked and (fast or backend not in (None, "reference")):
        # only the reference arithmetic reads unpacked weights: elsewhere the copy (4 GB at 2B-4T) would sit unused
        log.warning("--cache-unpacked is for the reference path; the %s path reads the packed bytes, so nothing is "
                    "unpacked", fast or backend)
        cache_unpacked = False
    tokenizer = Tokenizer(source.tokenizer, config.eos_token_id)
    if tokenizer.max_id >= config.vocab_size:  # such an id would index past the embedding mid-generation
        raise LoadError(f"the tokenizer has token id {tokenizer.max_id}, past the embedding's {config.vocab_size} rows")
    _check_tensors(source, config)

    def floats(name: str) -> torch.Tensor:
        # copy=True: never keep a view of the read-only mmap (the source is closed after loading)
        return source.torch(name).to(device=dev, dtype=dt, copy=True)

    def linear(name: str) -> BitLinear:
        packed, scale = source.ternary(name)
        out_f, in_f = source.tensors[name].shape
        if tuple(packed.shape) != (out_f, (in_f + 3) // 4) or tuple(scale.shape) not in ((1,), (out_f,)):
            raise LoadError(
                f"tensor {name!r}: packed {tuple(packed.shape)} / scale {tuple(scale.shape)} do not fit {out_f}x{in_f}"
            )
        if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
            raise LoadError(f"tensor {name!r}: its scale must be finite and > 0")
        lin = BitLinear(
            packed.to(device=dev, copy=True),  # the bytes, as bytes: unpacking happens on the device
            scale.to(device=dev, dtype=torch.float32, copy=True),
            in_f,
            cache_unpacked=cache_unpacked,
        )
        if backend is not None:
            lin.backend = backend
        return lin

    def norm(name: str) -> RMSNorm:
        return RMSNorm(floats(name), config.rms_norm_eps)

    t0 = time.perf_counter()
    blocks = []
    for n in range(config.num_hidden_layers):
        p = f"layers.{n}."
        attn = Attention(
            config,
            linear(p + "attn.q_proj.weight"),
            linear(p + "attn.k_proj.weight"),
            linear(p + "attn.v_proj.weight"),
            linear(p + "attn.o_proj.weight"),
            norm(p + "attn.sub_norm.weight") if config.sub_norms else None,
        )
        mlp = MLP(
            config,
            linear(p + "mlp.gate_proj.weight"),
            linear(p + "mlp.up_proj.weight"),
            linear(p + "mlp.down_proj.weight"),
            norm(p + "mlp.sub_norm.weight") if config.sub_norms else None,
        )
        blocks.append(Block(norm(p + "attn_norm.weight"), attn, norm(p + "mlp_norm.weight"), mlp))
    # the compiled CPU path computes in fp32 but reads the embedding and head in the file's 16 bits when that is
    # exact (rows upcast at use): at 2B-4T 0.66 GB instead of 1.3 GB, and the head's bytes are most of a token's
    narrow = fast == "cpu" and dt == torch.float32

    def vocab_matrix(name: str) -> torch.Tensor:
        t = source.torch(name)  # [V, D]: a view of the file, or a new tensor (a GGUF's dequantized Q4_K, ...)
        # a view of the file is copied (the source closes after the build; its storage is the mapping's, not
        # resizable); a new tensor already in the right dtype and device is kept, not copied a second time (at
        # 2B-4T 1.3 GB more at the peak of a CPU load)
        in_file = not t.untyped_storage().resizable()
        return t.to(device=dev, dtype=narrow_dtype(t) if narrow else dt, copy=in_file)

    embed = vocab_matrix("embed.weight")
    head_w = embed if config.tie_word_embeddings else vocab_matrix("lm_head.weight")
    net = Transformer(config, embed, blocks, norm("norm.weight"), head_w, dtype=dt).eval()
    log.info("built %s model on %s/%s in %.2fs", config.family, dev, dt, time.perf_counter() - t0)
    # FastModel routes every BitLinear of net through its backend too: its forward runs the o and down projections
    # of net's layers
    return BitNetModel(net, tokenizer, config, FastModel(net, head=head, backend=fast) if fast else None)


def open_weights(path, activation: str | None = None):
    """Open ``path`` as a weight source, detected by its magic: a packed file or a GGUF file. ``activation``
    ("relu2"|"silu") overrides the file's activation (GGUF files that mislabel 1bitLLM models need it)."""
    from bitnet158.formats.source import open_source

    return open_source(path, activation=activation)


def load(path, device=None, dtype=None, cache_unpacked: bool = False, activation: str | None = None, **opts):
    """Load a packed or GGUF model file for inference. ``activation`` overrides the file's (see open_weights);
    see ``build_model`` for the other options (force, backend, reference, head, compile_cpu)."""
    source = open_weights(path, activation)
    try:
        return build_model(source, device=device, dtype=dtype, cache_unpacked=cache_unpacked, **opts)
    finally:
        source.close()
