"""Tokenised prompts and the class logits of a causal LM: the next-token logits at the last prompt position,
restricted to one token per class (the verbaliser), as in MeZO's (arXiv 2305.17333) and DeComFL's (arXiv
2405.15861) classification objective. A fast path runs the base model and the LM head on the last position only,
once checked against the model's own logits."""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..base import model_device

PaddingSide = Literal["left", "right"]


def _encode(tokenizer: Any, text: str | list[str], add_special_tokens: bool) -> Any:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def verbalizer_token_ids(
    tokenizer: Any, words: Sequence[str], *, context: str = "", allow_multi_token: bool = False
) -> list[int]:
    """The token id that starts each verbaliser word when it follows ``context``; distinct, one per word.

    Raises ``ValueError`` when a word is not a single token (unless ``allow_multi_token``, which scores the
    first token only), when two words share their first token (the classes would be indistinguishable), or
    when a word merges with the end of the context.
    """
    if not words:
        raise ValueError("verbaliser is empty")
    prefix = _encode(tokenizer, context, add_special_tokens=False) if context else []
    ids = []
    for word in words:
        full = _encode(tokenizer, context + word, add_special_tokens=False)
        if full[: len(prefix)] != prefix or len(full) == len(prefix):
            raise ValueError(f"verbaliser word {word!r} merges with the prompt's end {context!r} when tokenized")
        rest = full[len(prefix) :]
        if len(rest) != 1 and not allow_multi_token:
            pieces = (
                [tokenizer.convert_ids_to_tokens(t) for t in rest]
                if hasattr(tokenizer, "convert_ids_to_tokens")
                else rest
            )
            raise ValueError(
                f"verbaliser word {word!r} is {len(rest)} tokens {pieces} for this tokenizer; choose single-token "
                "words or pass allow_multi_token=True to score the first token only"
            )
        ids.append(int(rest[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"verbaliser words {list(words)} do not start with distinct tokens: {ids}")
    return ids


@dataclass(frozen=True)
class TextBatch:
    """Padded prompts, the position of each prompt's last token, labels, and the verbaliser's token ids.

    ``class_logits(model)`` gives the next-token logits at ``last_index`` restricted to ``verbalizer_ids``.
    """

    input_ids: torch.Tensor  # int64 [B, L]
    attention_mask: torch.Tensor  # int64 [B, L], 1 on prompt tokens
    last_index: torch.Tensor  # int64 [B]
    labels: torch.Tensor  # int64 [B]
    verbalizer_ids: torch.Tensor  # int64 [C]
    padding_side: PaddingSide = "right"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> TextBatch:
        move = functools.partial(torch.Tensor.to, device=device, non_blocking=True)
        return replace(
            self,
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            last_index=move(self.last_index),
            labels=move(self.labels),
            verbalizer_ids=move(self.verbalizer_ids),
        )

    def class_logits(self, model: nn.Module) -> torch.Tensor:
        batch = self.to(model_device(model))
        return verbalizer_logits(
            model, batch.input_ids, batch.attention_mask, batch.last_index, batch.verbalizer_ids, batch.padding_side
        )


def _pad_token_id(tokenizer: Any) -> int:
    # Any valid id works: padded positions are masked out. Prefer the tokenizer's own pad, then EOS.
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _truncate_left(ids: list[int], max_length: int, keep_prefix: int) -> list[int]:
    """Drop tokens from the start (after a BOS-like prefix): the question and answer cue sit at the end."""
    if len(ids) <= max_length:
        return ids
    return ids[:keep_prefix] + ids[len(ids) - (max_length - keep_prefix) :]


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    verbalizer_ids: Sequence[int],
    *,
    max_length: int = 512,
    padding_side: PaddingSide = "right",
) -> TextBatch:
    """Tokenize and pad ``prompts`` into a :class:`TextBatch`.

    Special tokens are added as the tokenizer does by default (BOS for Llama-2/OPT, none for SmolLM2). Prompts
    longer than ``max_length`` lose tokens from the start (after BOS), as DeComFL truncates, so the end of the prompt,
    which the answer follows, always survives. Right padding is the default: it needs no position-id bookkeeping
    and never yields a fully masked attention row; left padding is supported (position ids are passed then).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if len(prompts) != len(labels):
        raise ValueError(f"{len(prompts)} prompts but {len(labels)} labels")
    if not prompts:
        raise ValueError("no prompts to encode")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    encoded = _encode(tokenizer, list(prompts), add_special_tokens=True)
    bos = getattr(tokenizer, "bos_token_id", None)
    seqs = []
    for ids in encoded:
        if not ids:
            raise ValueError("a prompt encoded to no tokens")
        keep = 1 if bos is not None and ids[0] == bos else 0
        seqs.append(_truncate_left(list(ids), max_length, keep))
    width = max(len(s) for s in seqs)
    pad = _pad_token_id(tokenizer)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(0, len(seq)) if padding_side == "right" else slice(width - len(seq), width)
        input_ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, cols] = 1
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    last_index = lengths - 1 if padding_side == "right" else torch.full_like(lengths, width - 1)
    return TextBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        last_index=last_index,
        labels=torch.as_tensor(np.asarray(labels), dtype=torch.long),
        verbalizer_ids=torch.tensor(list(verbalizer_ids), dtype=torch.long),
        padding_side=padding_side,
    )


# Per model: does the base-model + head shortcut reproduce the model's own logits? Checked once, on first use.
_FAST_PATH_OK: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@functools.cache
def _forward_params(cls: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _forward_kwargs(
    module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, padding_side: PaddingSide
) -> dict[str, Any]:
    params = _forward_params(type(module))
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "use_cache" in params:
        kwargs["use_cache"] = False  # a KV cache is only memory here
    if padding_side == "left" and "position_ids" in params:
        # Models count positions from the first column; left padding would shift absolute positions (OPT, GPT-2).
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return kwargs


def _fast_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(base model, LM head) for Hugging Face causal LMs, None for anything else."""
    base = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if base is None or base is model or not isinstance(base, nn.Module) or get_head is None:
        return None
    head = get_head()
    return (base, head) if isinstance(head, nn.Linear) else None


def _fast_logits(model, input_ids, attention_mask, last_index, verbalizer_ids, padding_side) -> torch.Tensor:
    base, head = _fast_parts(model)  # type: ignore[misc]
    out = base(**_forward_kwargs(base, input_ids, attention_mask, padding_side))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, last_index]  # [B, H]: the LM head runs on B vectors, not B x L
    bias = head.bias[verbalizer_ids] if head.bias is not None else None
    return nn.functional.linear(last, head.weight[verbalizer_ids], bias)  # and only on C rows of the vocabulary


def _full_logits(model, input_ids, attention_mask, last_index, verbalizer_ids, padding_side) -> torch.Tensor:
    out = model(**_forward_kwargs(model, input_ids, attention_mask, padding_side))
    logits = out.logits if hasattr(out, "logits") else out[0]
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, last_index][:, verbalizer_ids]


def _check_fast_path(model, input_ids, attention_mask, last_index, verbalizer_ids, padding_side) -> bool:
    """Compare the shortcut with the model's own forward on one short prompt.

    Some heads post-process logits (Gemma-2/3 soft-capping, Cohere's logit scale); rather than list them, test.
    """
    if _fast_parts(model) is None:
        return False
    row_ids = input_ids[0][attention_mask[0].bool()][-64:].unsqueeze(0)  # a cheap probe: the prompt's last 64 tokens
    mask = torch.ones_like(row_ids)
    last = torch.tensor([row_ids.shape[1] - 1], device=row_ids.device)
    was_training = model.training
    model.eval()  # dropout would make the two forwards differ
    try:
        with torch.no_grad():
            fast = _fast_logits(model, row_ids, mask, last, verbalizer_ids, "right").float()
            full = _full_logits(model, row_ids, mask, last, verbalizer_ids, "right").float()
    except Exception as exc:
        warnings.warn(f"last-position logits shortcut failed ({exc!r}); using the full forward", stacklevel=3)
        return False
    finally:
        model.train(was_training)
    half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    tolerance = (3e-2 if half else 2e-3) * float(full.abs().max().clamp_min(1.0))  # TF32 matmuls stay inside 2e-3
    diff = float((fast - full).abs().max())
    if diff > tolerance:
        warnings.warn(
            f"{type(model).__name__}: base model + LM head differs from the model's logits by {diff:.3g}; "
            "computing full logits (slower)",
            stacklevel=3,
        )
        return False
    return True


def verbalizer_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    last_index: torch.Tensor,
    verbalizer_ids: torch.Tensor,
    padding_side: PaddingSide = "right",
) -> torch.Tensor:
    """Next-token logits at ``last_index`` for the verbaliser tokens, ``[B, C]``.

    For Hugging Face causal LMs this runs the base model and applies the LM head to the B last hidden states and
    the C verbaliser rows only (the full ``[B, L, vocab]`` logits of SmolLM2 at B=16, L=64 are 200 MB and about a
    fifth of the FLOPs). Whether that shortcut matches the model's own logits is checked once per model; models
    without that structure, or whose check fails, use ``model(...).logits``.
    """
    ok = _FAST_PATH_OK.get(model)
    if ok is None:
        ok = _check_fast_path(model, input_ids, attention_mask, last_index, verbalizer_ids, padding_side)
        _FAST_PATH_OK[model] = ok
    compute = _fast_logits if ok else _full_logits
    return compute(model, input_ids, attention_mask, last_index, verbalizer_ids, padding_side)
