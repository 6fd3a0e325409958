"""Multiple-choice scoring with a causal LM, as MeZO does (arXiv 2305.17333): each choice is appended to the prompt,
and its score is the mean log-probability of the choice's own tokens (length-normalised log-likelihood;
``large_models/run.py`` ``one_step_pred``); the prediction is the highest score, and training minimises the
cross-entropy over the scores (``large_models/utils.py`` ``forward_wrap_with_option_len`` with
``train_as_classification``). A choice's tokens are those of prompt + choice beyond the prompt's own tokens, as MeZO
counts them (``encode_prompt``: ``option_len``)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..base import model_device
from .logits import _FAST_PATH_OK, _check_fast_path, _encode, _fast_parts, _forward_kwargs, _pad_token_id


@dataclass(frozen=True)
class ChoiceBatch:
    """B examples x C choices as N = B C right-padded sequences (prompt + choice) and a mask of the choice tokens.

    ``class_logits(model)`` gives the ``[B, C]`` mean log-probabilities of each choice's tokens.
    """

    input_ids: torch.Tensor  # int64 [N, L]
    attention_mask: torch.Tensor  # int64 [N, L]
    choice_mask: torch.Tensor  # bool [N, L]: True where the token belongs to the choice (never column 0)
    labels: torch.Tensor  # int64 [B]
    num_choices: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> ChoiceBatch:
        move = functools.partial(torch.Tensor.to, device=device, non_blocking=True)
        return replace(self, input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
                       choice_mask=move(self.choice_mask), labels=move(self.labels))

    def class_logits(self, model: nn.Module) -> torch.Tensor:
        b = self.to(model_device(model))
        scores = choice_scores(model, b.input_ids, b.attention_mask, b.choice_mask)
        return scores.view(len(self), self.num_choices)


def encode_choices(
    tokenizer: Any,
    prompts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    labels: Sequence[int] | np.ndarray,
    *,
    max_length: int = 512,
) -> ChoiceBatch:
    """Tokenize each prompt + each of its continuations into a :class:`ChoiceBatch`.

    Sequences longer than ``max_length`` lose tokens from the start (after a BOS token), so the choice survives;
    a choice that does not fit, or that adds no token to its prompt, raises ``ValueError``.
    """
    if len(prompts) != len(continuations) or len(prompts) != len(labels):
        raise ValueError(f"{len(prompts)} prompts, {len(continuations)} choice lists and {len(labels)} labels")
    if not prompts:
        raise ValueError("no prompts to encode")
    num_choices = len(continuations[0])
    if num_choices < 2 or any(len(c) != num_choices for c in continuations):
        raise ValueError("every example needs the same number (>= 2) of choices")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    prompt_ids = _encode(tokenizer, list(prompts), add_special_tokens=True)
    full_ids = _encode(tokenizer, [p + c for p, cs in zip(prompts, continuations) for c in cs], add_special_tokens=True)
    bos = getattr(tokenizer, "bos_token_id", None)
    seqs, lengths = [], []
    for i, ids in enumerate(full_ids):
        ex, choice = divmod(i, num_choices)
        n_choice = len(ids) - len(prompt_ids[ex])
        if n_choice < 1:
            raise ValueError(f"choice {continuations[ex][choice]!r} adds no token to its prompt")
        keep = 1 if bos is not None and ids and ids[0] == bos else 0
        if n_choice > max_length - keep - 1:
            raise ValueError(f"choice {continuations[ex][choice]!r} is {n_choice} tokens: it does not fit max_length "
                             f"{max_length} with at least one prompt token")
        if len(ids) > max_length:
            ids = list(ids[:keep]) + list(ids[len(ids) - (max_length - keep):])
        seqs.append(list(ids))
        lengths.append(n_choice)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), _pad_token_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    choice_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, (seq, n) in enumerate(zip(seqs, lengths)):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
        choice_mask[row, len(seq) - n : len(seq)] = True
    return ChoiceBatch(input_ids, attention_mask, choice_mask, torch.tensor(np.asarray(labels), dtype=torch.long),
                       num_choices)


def choice_scores(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, choice_mask: torch.Tensor
) -> torch.Tensor:
    """Mean log-probability of the masked tokens of each row, ``[N]`` float32.

    Token t is predicted at position t - 1. For Hugging Face causal LMs the LM head runs only on those positions (the
    full ``[N, L, vocab]`` logits are never formed), once checked against the model's own logits as for verbalisers.
    """
    rows, cols = choice_mask.nonzero(as_tuple=True)
    targets = input_ids[rows, cols]
    ok = _FAST_PATH_OK.get(model)
    if ok is None:
        last = attention_mask.sum(-1) - 1
        ok = _check_fast_path(model, input_ids, attention_mask, last, torch.unique(targets), "right")
        _FAST_PATH_OK[model] = ok
    if ok:
        base, head = _fast_parts(model)  # type: ignore[misc]
        out = base(**_forward_kwargs(base, input_ids, attention_mask, "right"))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        logits = head(hidden[rows, cols - 1])
    else:
        out = model(**_forward_kwargs(model, input_ids, attention_mask, "right"))
        logits = (out.logits if hasattr(out, "logits") else out[0])[rows, cols - 1]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=logp.device).index_add_(0, rows, logp)
    return sums / choice_mask.sum(-1).to(sums)
