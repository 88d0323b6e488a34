"""The Python API: ``model = load(path)``; ``model.logits`` / ``generate`` / ``chat`` / ``perplexity`` /
``tokenizer``."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from bitnet158.formats.config import ModelConfig
from bitnet158.runtime.bitlinear import BitLinear
from bitnet158.runtime.fast import FastModel, GraphDecoder
from bitnet158.runtime.generate import (
    ContextOverflowError,
    GenerationStats,
    fit_context,
    generate_tokens,
    stream_text,
)
from bitnet158.runtime.model import Transformer
from bitnet158.runtime.perplexity import check_windows
from bitnet158.runtime.perplexity import perplexity as _perplexity
from bitnet158.runtime.sampling import Sampler, SamplingParams
from bitnet158.runtime.tokenizer import Tokenizer

# Generated tokens when the caller gives no max_new_tokens (capped by the room left in the context).
DEFAULT_MAX_NEW_TOKENS = 256


def _stop_strings(stop: str | Sequence[str]) -> list[str]:
    # one string is one stop string, not a stop at each of its characters
    return [stop] if isinstance(stop, str) else list(stop)


class BitNetModel:
    """A loaded model: the network (``net``), its ``config`` and ``tokenizer``.

    With ``fast`` (a FastModel over ``net``: the default on CUDA) logits and perplexity run its forward, and
    generation decodes through a GraphDecoder (CUDA graphs on CUDA, the same steps eagerly elsewhere).
    """

    def __init__(self, net: Transformer, tokenizer: Tokenizer, config: ModelConfig, fast: FastModel | None = None):
        self.net = net
        self.tokenizer = tokenizer
        self.config = config
        self.fast = fast
        self._decoder: GraphDecoder | None = None
        self.last_stats: GenerationStats | None = None
        # calls that (re)write the one KV cache: a generation that another has followed cannot go on (_on_device_each)
        self._cache_writes = 0

    @property
    def device(self) -> torch.device:
        return self.net.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    def resident_weight_bytes(self) -> int:
        """Bytes of weights resident on the device (packed ternary, unpacked caches if any, floats, int8 head)."""
        return self.fast.resident_bytes() if self.fast is not None else self.net.resident_weight_bytes()

    @property
    def backend(self) -> str:
        """The BitLinear backend the network runs ("reference", "triton", ...)."""
        return next(m for m in self.net.modules() if isinstance(m, BitLinear)).backend

    def _on_device(self):
        # The model's GPU as the current CUDA device while it runs: Triton launches on the current device (and its
        # stream) whatever its tensors' device, and a CUDA graph captures there, so a model loaded on cuda:1 would
        # otherwise run its kernels on cuda:0 with cuda:1's pointers
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _on_device_each(self, tokens: Iterator[int], write: int) -> Iterator[int]:
        # a generation, each step between two ids on the model's device, and the caller's code between them on
        # the caller's (another model's generation may run there). ``write``: its _cache_writes; once another call
        # has written the KV cache, this one's next step would attend to that call's keys and values instead
        try:
            while True:
                if self._cache_writes != write:
                    raise RuntimeError("this generation cannot go on: a later generate, chat, logits or perplexity "
                                       "call on the model has rewritten its KV cache (finish or close a generation "
                                       "before starting another)")  # fmt: skip
                with self._on_device():
                    tok = next(tokens, None)
                if tok is None:
                    return
                yield tok
        finally:
            with self._on_device():
                tokens.close()

    def _forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        # fp32 logits [B, T, V] of every position, through the fast forward when there is one (it has the int8 head)
        if self.fast is not None:
            return self.fast.logits(tokens, start_pos, last_only=False)
        return self.net(tokens, start_pos)

    def _graph_decoder(self, need: int, grow: bool = False) -> GraphDecoder:
        # A decoder's graphs point at the KV cache it was captured on, so make a new one when it is too small or
        # when logits()/perplexity() have grown (reallocated) the network's cache since. ``grow`` (a chat): at
        # least double it, up to the context, and keep what the old cache held (setup_cache copies it over).
        dec = self._decoder
        if dec is None or dec.max_seq < need or dec.max_seq != self.net.max_seq:
            held = dec.context() if grow and dec is not None and dec.max_seq == self.net.max_seq else []
            if grow and dec is not None:
                need = min(max(need, 2 * dec.max_seq), self.config.max_position_embeddings)
            self._decoder = None  # drop the old graphs before capturing new ones
            dec = self._decoder = GraphDecoder(self.fast, need, use_graph=self.device.type == "cuda")
            dec.adopt(held)
        return dec

    def _forget_cache(self) -> None:
        # a forward outside the decoder writes into the cache: the decoder's record of it no longer holds
        if self._decoder is not None:
            self._decoder.forget()

    def _token_ids(self, token_ids, what: str) -> torch.Tensor:
        # int64 [n] of a 1-D sequence of integer ids, each in the vocabulary (an id past the embedding would fail
        # mid-run, on CUDA as a device assert); a batch, floats or bools are refused, not flattened or truncated
        try:
            ids = torch.as_tensor(token_ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{what}: token ids must be a 1-D sequence of integers ({e})") from None
        numeric = ids.dtype != torch.bool and not ids.is_floating_point() and not ids.is_complex()
        if ids.dim() != 1 or not numeric and ids.numel():  # ([] is float32: an empty list has no dtype to refuse)
            raise ValueError(f"{what}: token ids must be a 1-D sequence of integers, got {ids.dtype} "
                             f"{tuple(ids.shape)}")  # fmt: skip
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"{what}: token ids must be in [0, {self.config.vocab_size})")
        return ids.long()

    @torch.inference_mode()
    def logits(self, token_ids) -> torch.Tensor:
        """fp32 logits [len(token_ids), vocab] for a 1-D list or tensor of ids; no BOS added, no sampling."""
        ids = self._token_ids(token_ids, "logits")
        n = ids.numel()
        if n == 0:
            raise ValueError("logits: token_ids is empty")
        if n > self.config.max_position_embeddings:
            raise ContextOverflowError(f"{n} tokens exceed the model context of {self.config.max_position_embeddings}")
        self._cache_writes += 1
        with self._on_device():
            self.net.setup_cache(1, n)
            self._forget_cache()
            return self._forward(ids.to(self.device)[None], 0)[0]

    def encode_prompt(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        """Prompt ids. chat=True renders a one-user-message chat with the file's template first (after a
        ``system`` message if given).

        BOS comes from the tokenizer's post-processor, except when a rendered chat already starts with the BOS
        string (templates that write ``{{ bos_token }}``), so that it is never doubled.
        """
        if not chat:
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        head = [{"role": "system", "content": system}] if system is not None else []
        return self.encode_chat([*head, {"role": "user", "content": prompt}])

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Ids of ``messages`` ({"role", "content"} dicts) rendered with the file's chat template, ready for the
        assistant's reply; BOS as in ``encode_prompt``."""
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        bos = self.tokenizer.bos_token
        return self.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))

    def chat_reply_tokens(self, max_new_tokens: int | None = None) -> int:
        """The reply length a chat turn allows: ``max_new_tokens``, or by default DEFAULT_MAX_NEW_TOKENS and at
        most half the context."""
        if max_new_tokens is not None:  # 0 is refused by generate_ids, not read as the default
            return max_new_tokens
        return min(DEFAULT_MAX_NEW_TOKENS, self.config.max_position_embeddings // 2)

    def fit_chat(self, messages: Sequence[dict], max_new_tokens: int | None = None, slack: int = 0) -> list[dict]:
        """``messages`` without as many of the oldest turns (after a leading system message) as it takes for the
        rendered conversation and a reply of ``chat_reply_tokens(max_new_tokens)`` to fit the context. A turn is a
        user message and the replies after it. ContextOverflowError when the last user message alone does not fit.

        ``slack``: once turns must go, drop until ``slack`` more tokens are free too (as far as possible), so that
        the next turns extend the conversation, and reuse the KV cache, instead of dropping again at each turn."""
        n = self.chat_reply_tokens(max_new_tokens)
        msgs = list(messages)
        first = 1 if msgs and msgs[0].get("role") == "system" else 0
        ctx = self.config.max_position_embeddings
        extra = 0  # slack applies only once something has to be dropped
        while (need := len(self.encode_chat(msgs)) + n) + extra > ctx:
            rest = msgs[first + 1 :]
            nxt = next((i for i, m in enumerate(rest) if m.get("role") == "user"), None)
            if nxt is None:  # the last user message is all there is to drop
                if need <= ctx:
                    break  # it fits, with less slack than asked
                raise ContextOverflowError(
                    f"the last message and {n} new tokens do not fit the context of {ctx} tokens"
                )
            msgs = msgs[:first] + rest[nxt:]
            extra = slack
        return msgs

    def chat(
        self,
        messages: Sequence[dict],
        max_new_tokens: int | None = None,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        stats: GenerationStats | None = None,
    ) -> Iterator[str]:
        """Stream the assistant's reply to a conversation, ``messages`` ({"role", "content"} dicts, rendered with
        the file's chat template; pass ``fit_chat``'s result to drop the oldest turns when it outgrows the context).

        The KV cache keeps the conversation between calls: when the next call's conversation starts with this
        one and its reply, the fast path runs only the new tokens (``generate_ids(reuse_cache=True)``).
        ``max_new_tokens=None``: up to DEFAULT_MAX_NEW_TOKENS, at most half the context (``chat_reply_tokens``).
        Stops at the template's end-of-turn ids, at a ``stop`` string, or after ``max_new_tokens``."""
        n = self.chat_reply_tokens(max_new_tokens)
        prompt_ids = self.encode_chat(messages)
        stats = stats if stats is not None else GenerationStats()
        tokens = self.generate_ids(
            prompt_ids, n, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, seed=seed, stop_ids=self.tokenizer.chat_stop_ids(), stats=stats,
            reuse_cache=True,
        )  # fmt: skip
        return stream_text(self.tokenizer, tokens, prompt_ids, _stop_strings(stop), stats)

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int | None = None,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_ids: Sequence[int] | None = None,
        truncate: bool = False,
        stats: GenerationStats | None = None,
        reuse_cache: bool = False,
    ) -> Iterator[int]:
        """Token-level generation after ``prompt_ids``; validates everything before returning the iterator.

        ``max_new_tokens=None`` means up to DEFAULT_MAX_NEW_TOKENS, fewer when the context has less room left
        (half the context when the prompt fills it: room that ``truncate`` makes); a number that does not fit is
        an error, or with ``truncate`` drops the oldest prompt tokens (a leading BOS stays).
        ``reuse_cache`` (fast path only): skip the prompt's prefix that the last generation left in the cache
        (GraphDecoder.generate's ``reuse``; ``stats.cached_tokens`` counts it), as ``chat`` does.
        """
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, seed=seed)  # fmt: skip
        prompt_ids = self._token_ids(prompt_ids, "generate_ids").tolist()
        ctx = self.config.max_position_embeddings
        if max_new_tokens is None:  # no room left: what truncating the prompt makes room for, half the context
            room = ctx - len(prompt_ids)
            max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, room if room > 0 else max(1, ctx // 2))
        keep = int(len(prompt_ids) > 0 and prompt_ids[0] == self.config.bos_token_id)
        ids, dropped = fit_context(list(prompt_ids), max_new_tokens, ctx, truncate, keep)
        stats = stats if stats is not None else GenerationStats()
        stats.truncated_tokens = dropped
        self.last_stats = stats
        stops = tuple(self.config.eos_token_id) if stop_ids is None else tuple(stop_ids)
        if self.fast is not None:  # the graph decoder: every step and its sampling on the device
            with self._on_device():
                dec = self._graph_decoder(len(ids) + max_new_tokens, grow=reuse_cache)
            stats.path = f"{self.backend} + CUDA graph" if dec.use_graph else f"{self.backend} + device sampling"
            tokens = dec.generate(
                ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, seed=seed, stop_ids=stops, stats=stats, reuse=reuse_cache,
            )  # fmt: skip
        else:
            stats.path = self.backend
            tokens = generate_tokens(self.net, ids, max_new_tokens, Sampler(params, self.device), stops, stats)
        self._cache_writes += 1  # only now, once nothing can refuse the call
        return self._on_device_each(tokens, self._cache_writes)

    def generate(
        self,
        prompt: str,
        max_new_tokens: int | None = None,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        chat: bool = False,
        system: str | None = None,
        truncate: bool = False,
        stats: GenerationStats | None = None,
    ) -> Iterator[str]:
        """Stream generated text pieces. Stops at EOS (any of the config's ids; in chat mode also end-of-turn
        tokens), at a ``stop`` string (not emitted), or after ``max_new_tokens``. Timing and counts land in
        ``stats`` (or ``model.last_stats``)."""
        if system is not None and not chat:
            raise ValueError("a system message needs chat=True")
        prompt_ids = self.encode_prompt(prompt, chat, system)
        stats = stats if stats is not None else GenerationStats()
        stop_ids = self.tokenizer.chat_stop_ids() if chat else tuple(self.config.eos_token_id)
        tokens = self.generate_ids(
            prompt_ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop_ids=stop_ids,
            truncate=truncate,
            stats=stats,
        )
        return stream_text(self.tokenizer, tokens, prompt_ids, _stop_strings(stop), stats)

    def perplexity(
        self, text: str, ctx: int | None = None, stride: int | None = None, progress: bool = False
    ) -> tuple[float, int]:
        """(perplexity, scored tokens) of ``text`` in windows of ``ctx`` tokens (default: the model context)
        advancing by ``stride`` (default ctx // 2); see runtime/perplexity.py for exactly which tokens count."""
        ids = self.tokenizer.encode(text, add_special_tokens=True)
        ctx = self.config.max_position_embeddings if ctx is None else ctx  # 0 is refused (window_plan), not a default
        stride = max(1, ctx // 2) if stride is None else stride
        check_windows(len(ids), ctx, stride, self.config.max_position_embeddings)  # a refused call writes nothing
        self._cache_writes += 1
        self._forget_cache()
        with self._on_device():
            return _perplexity(self.net, ids, ctx, stride, progress=progress, forward=self._forward)
