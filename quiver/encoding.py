"""Tokenized batches and their planning: how texts become model inputs, the same way on every path.

Texts are grouped into forward passes by one plan (`plan_batches`), so the same text always meets the same
neighbours and gets the bit-identical vector, whichever path (sync, async, query) encoded it. Tokenizing
goes straight to the model's Rust tokenizer, each thread with its own copy, when it reproduces the model's
own preprocessing on probe texts tensor for tensor; its Python wrapper holds the GIL, the Rust encoder does
not.
"""

import copy
import os
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

# Each thread tokenizes with its own copy of the tokenizer: a shared fast tokenizer is not thread-safe.
_THREAD_LOCAL = threading.local()


@dataclass
class TokenizedBatch:
    """One forward pass's texts, tokenized: which rows of the caller's list they fill, and the model inputs."""

    positions: list[int]
    features: dict[str, Any]
    tokens: int


def _thread_cache(name: str) -> dict[Any, Any]:
    """This thread's own dict `name` (per-thread tokenizers: a shared fast tokenizer is not thread-safe)."""
    cache = getattr(_THREAD_LOCAL, name, None)
    if cache is None:
        cache = {}
        setattr(_THREAD_LOCAL, name, cache)
    return cache


def plan_batches(lengths: list[int], batch_size: int, window: int = 4096) -> list[list[int]]:
    """Positions of texts grouped into forward passes of `batch_size`: within each window of `window` texts,
    longest first by token length, so that a batch's texts have similar lengths and padding stays small (a
    window of 1 keeps input order); the window bounds what is sorted at once. Ties keep input order.

    Every encoding path uses this one plan, so the same texts always meet the same neighbours and get
    bit-identical vectors, whichever path (sync, async, query) encoded them.
    """
    order: list[int] = []
    for first in range(0, len(lengths), window):
        order += sorted(range(first, min(first + window, len(lengths))), key=lambda i: -lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def padded_tokens(lengths: list[int]) -> int:
    """Tokens a forward pass computes for texts of these lengths, padded to the longest."""
    return max(lengths, default=0) * len(lengths)


def token_lengths(state: "LoadedModel", texts: list[str]) -> list[int]:
    """Each text's length in the model's tokens (special tokens included, cut at its window); characters for
    a model whose tokenizer is not a fast one (no padding to avoid there: a static model pads nothing)."""
    module = state.base[0]
    tokenizer = getattr(module, "tokenizer", None)
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return [len(t) for t in texts]
    cache, key = _thread_cache("length_tokenizers"), (state.fingerprint, os.getpid())
    counter = cache.get(key)
    if counter is None:
        from tokenizers import Tokenizer

        counter = cache[key] = Tokenizer.from_str(backend.to_str())
        counter.no_padding()
        counter.enable_truncation(int(module.max_seq_length), strategy="longest_first")
    return [len(e.ids) for e in counter.encode_batch(texts, add_special_tokens=True)]


@dataclass
class PoolMetrics:
    texts: int = 0
    tokens: int = 0
    batches: int = 0
    tokenize_seconds: float = 0.0
    encode_seconds: float = 0.0
    wait_seconds: float = 0.0
    reloads: int = 0
    failures: int = 0
    padded_tokens: int = 0  # tokens the forward passes computed, padding included
    padded_tokens_in_input_order: int = 0  # what batches cut in input order would have computed

    def minus(self, earlier: "PoolMetrics") -> "PoolMetrics":
        return PoolMetrics(*(getattr(self, f) - getattr(earlier, f) for f in self.__dataclass_fields__))


def metrics_metadata(delta: PoolMetrics) -> dict[str, float | int]:
    seconds = delta.encode_seconds or 1e-9
    return {
        "texts_encoded": delta.texts,
        "tokens_encoded": delta.tokens,
        "encode_batches": delta.batches,
        "tokenize_seconds": round(delta.tokenize_seconds, 3),
        "encode_seconds": round(delta.encode_seconds, 3),
        "texts_per_second": round(delta.texts / seconds, 1) if delta.texts else 0.0,
        "tokens_per_second": round(delta.tokens / seconds, 1) if delta.tokens else 0.0,
        "instance_wait_seconds": round(delta.wait_seconds, 4),
        "padding_fraction": round(1 - delta.tokens / delta.padded_tokens, 4) if delta.padded_tokens else 0.0,
        "padding_fraction_in_input_order": round(1 - delta.tokens / delta.padded_tokens_in_input_order, 4)
        if delta.padded_tokens_in_input_order else 0.0,
        "instance_reloads": delta.reloads,
    }


class LoadedModel(Protocol):
    """What preprocessing needs of a loaded model in a process (the model pool's PoolState)."""

    fingerprint: str
    base: Any
    lock: threading.Lock
    preprocess_lock: threading.Lock
    rust_check: tuple[dict[str, Any] | None] | None


# Texts on which a direct Rust tokenizer must reproduce the model's own preprocessing before it is used:
# short and long (past any max length), unicode, case, stray whitespace.
PROBE_TEXTS = [
    "a",
    "Title\nA short body.",
    "  Leading and trailing  whitespace,\tand\ttabs \n",
    "Naïve café — 東京 Ünïcödé, emoji 🙂, and ligatures ﬁ",
    "MiXeD CaSe AND NUMBERS 12345 3.14159 e=mc^2",
    " ".join(f"token{i} supercalifragilisticexpialidocious" for i in range(700)),
]


class RustTextPreprocessor:
    """The model's text preprocessing done by its Rust tokenizer alone.

    Sentence-transformers ends in the same Rust encode_batch (truncate longest-first, pad to the longest),
    but its Python wrapper holds the GIL for most of the time; encode_batch does not, so tokenizing
    threads overlap with each other and with the forward passes. Used only when it reproduces the
    model's own features exactly (see `exact_rust_preprocessing`). Each thread has its own copy.
    """

    def __init__(self, tokenizer: Any, max_length: int, extra: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.names = list(tokenizer.model_input_names)
        self.extra = extra
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.enable_truncation(max_length, strategy="longest_first",
                                       direction=getattr(tokenizer, "truncation_side", "right"))
        self.backend.enable_padding(direction=getattr(tokenizer, "padding_side", "right"),
                                    pad_id=tokenizer.pad_token_id, pad_type_id=tokenizer.pad_token_type_id,
                                    pad_token=tokenizer.pad_token)

    def __call__(self, texts: list[str]) -> dict[str, Any]:
        import torch

        encodings = self.backend.encode_batch(texts, add_special_tokens=True)
        fields = {"input_ids": "ids", "token_type_ids": "type_ids", "attention_mask": "attention_mask"}
        features: dict[str, Any] = {
            name: torch.from_numpy(np.array([getattr(e, fields[name]) for e in encodings], dtype=np.int64))
            for name in self.names
        }
        features.update(self.extra)
        return features


def exact_rust_preprocessing(state: LoadedModel) -> dict[str, Any] | None:
    """The non-tensor entries of the model's features if RustTextPreprocessor reproduces its preprocessing
    on PROBE_TEXTS, tensor for tensor; None (use the model's own preprocessing) otherwise."""
    import torch

    module = state.base[0]
    tokenizer = getattr(module, "tokenizer", None)
    if tokenizer is None or not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        return None
    if not set(tokenizer.model_input_names) <= {"input_ids", "token_type_ids", "attention_mask"}:
        return None
    try:
        with state.preprocess_lock:
            expected = state.base.preprocess(PROBE_TEXTS)
        extra = {k: v for k, v in expected.items() if not isinstance(v, torch.Tensor)}
        got = RustTextPreprocessor(tokenizer, module.max_seq_length, extra)(PROBE_TEXTS)
    except Exception:  # noqa: BLE001 - any doubt: the model's own path
        return None
    same = set(got) == set(expected) and all(
        torch.equal(got[k], expected[k]) and got[k].dtype == expected[k].dtype if isinstance(expected[k], torch.Tensor)
        else got[k] == expected[k] for k in expected)
    return extra if same else None


def thread_preprocessor(state: LoadedModel) -> Any:
    """This thread's own preprocess function for the model: the Rust tokenizer when it is exact, else
    the model's input module with a private tokenizer (a shared fast tokenizer is not thread-safe)."""
    cache, key = _thread_cache("preprocessors"), (state.fingerprint, os.getpid())
    found = cache.get(key)
    if found is None:
        if state.rust_check is None:
            with state.lock:
                if state.rust_check is None:
                    state.rust_check = (exact_rust_preprocessing(state),)
        module = state.base[0]
        extra = state.rust_check[0]
        if extra is not None:
            found = RustTextPreprocessor(module.tokenizer, module.max_seq_length, extra)
        elif hasattr(module, "processor"):
            module = copy.copy(module)  # shares the weights; only the tokenizer is private
            module.processor = copy.deepcopy(module.processor)
            found = module.preprocess
        else:  # an input module of another kind: serialize its use instead

            def found(texts: list[str], _state: LoadedModel = state) -> dict[str, Any]:
                with _state.preprocess_lock:
                    return _state.base.preprocess(texts)

        cache[key] = found
    return found
