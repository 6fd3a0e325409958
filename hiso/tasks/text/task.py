"""The prompt + verbaliser classification task (SST-2, CB, RTE) on top of the data, prompts and logits modules."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..base import ClassificationTask, batch_order
from .data import TextExample, TextExamples, TextTaskSpec, _spec, load_text_examples
from .logits import PaddingSide, TextBatch, _encode, encode_prompts, verbalizer_token_ids
from .prompts import TEMPLATES, PromptTemplate


@dataclass
class TextClassificationTask(ClassificationTask):
    """A prompt + verbaliser task; batches need a tokenizer (``tokenizer=`` or :meth:`set_tokenizer`)."""

    spec: TextTaskSpec
    template: PromptTemplate
    train_examples: TextExamples
    eval_examples: TextExamples
    tokenizer: Any = None
    max_length: int = 512
    padding_side: PaddingSide = "right"
    allow_multi_token: bool = False
    source: str = ""
    _verbalizer_ids: list[int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if len(self.template.verbalizer) != len(self.spec.label_names):
            raise ValueError(
                f"template {self.template.name!r} has {len(self.template.verbalizer)} verbaliser words for "
                f"{len(self.spec.label_names)} labels {self.spec.label_names}"
            )
        unknown = set(self.template.field_names) - set(self.spec.field_names)
        if unknown:
            raise ValueError(f"template {self.template.name!r} uses fields {sorted(unknown)} that {self.name} lacks")
        if self.tokenizer is not None:
            self.set_tokenizer(self.tokenizer)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.spec.name

    @property
    def label_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.spec.label_names

    def set_tokenizer(self, tokenizer: Any) -> TextClassificationTask:
        """Bind a tokenizer and resolve (and check) the verbaliser token ids for it."""
        probe = _encode(tokenizer, "x", add_special_tokens=True)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None and probe and probe[-1] == eos:
            raise ValueError(
                "the tokenizer appends EOS to every text; the last prompt position would be EOS, not the prompt's "
                "end. Load it with add_eos_token=False."
            )
        self._verbalizer_ids = verbalizer_token_ids(
            tokenizer,
            self.template.verbalizer,
            context=self.template.answer_context,
            allow_multi_token=self.allow_multi_token,
        )
        self.tokenizer = tokenizer
        return self

    @property
    def verbalizer_ids(self) -> list[int]:
        if self._verbalizer_ids is None:
            raise RuntimeError(f"task {self.name!r} has no tokenizer: pass tokenizer= or call set_tokenizer()")
        return list(self._verbalizer_ids)

    def prompt(self, example: TextExample) -> str:
        return self.template.render(example)

    def eval_batches(self, batch_size: int) -> list[TextBatch]:
        """The evaluation split in batches of similar prompt length."""
        return self.make_batches(self.eval_examples, batch_size, sort_by_length=True)

    def make_batches(
        self,
        examples: TextExamples,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        sort_by_length: bool = False,
    ) -> list[TextBatch]:
        """See :meth:`ClassificationTask.make_batches`; ``sort_by_length`` batches prompts of similar length
        together (less padding: for evaluation, where order does not matter; not with ``shuffle``)."""
        verbalizer_ids = self.verbalizer_ids  # raises first if there is no tokenizer
        if sort_by_length and shuffle:
            raise ValueError("sort_by_length and shuffle exclude each other")
        prompts = [self.prompt(ex) for ex in examples]
        order = np.argsort([len(p) for p in prompts], kind="stable") if sort_by_length else np.arange(len(prompts))
        batches = []
        for idx in batch_order(len(examples), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last):
            chosen = order[idx]
            batches.append(
                encode_prompts(
                    self.tokenizer,
                    [prompts[i] for i in chosen],
                    [examples[int(i)].label for i in chosen],
                    verbalizer_ids,
                    max_length=self.max_length,
                    padding_side=self.padding_side,
                )
            )
        return batches


def _subsample(examples: TextExamples, n: int | None, rng: np.random.Generator) -> TextExamples:
    """A uniform random subset of ``n`` examples kept in file order (MeZO samples its 1,000 training examples)."""
    if n is None or n >= len(examples):
        return examples
    if n < 1:
        raise ValueError(f"subset size must be positive, got {n}")
    return examples.subset(np.sort(rng.choice(len(examples), size=n, replace=False)))


def load_text_task(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    tokenizer: Any = None,
    template: str | PromptTemplate = "mezo",
    max_length: int = 512,
    padding_side: PaddingSide = "right",
    num_train: int | None = None,
    num_eval: int | None = None,
    seed: int = 0,
    allow_multi_token: bool = False,
    hf_path: str | None = None,
    hf_config: str | None = None,
    cache_dir: str | None = None,
) -> TextClassificationTask:
    """Load SST-2, CB or RTE (see :func:`load_text_examples` for where from) as a :class:`TextClassificationTask`.

    ``num_train``/``num_eval`` keep a random subset (deterministic in ``seed``); ``template`` is a name from
    :data:`TEMPLATES` or a :class:`PromptTemplate`.
    """
    spec = _spec(name)
    if isinstance(template, str):
        try:
            template = TEMPLATES[name][template]
        except KeyError:
            raise ValueError(f"unknown template {template!r} for {name}; known: {sorted(TEMPLATES[name])}") from None
    train, eval_, source = load_text_examples(name, data_dir, hf_path=hf_path, hf_config=hf_config, cache_dir=cache_dir)
    train = _subsample(train, num_train, np.random.default_rng([seed, 0]))
    eval_ = _subsample(eval_, num_eval, np.random.default_rng([seed, 1]))
    return TextClassificationTask(
        spec=spec,
        template=template,
        train_examples=train,
        eval_examples=eval_,
        tokenizer=tokenizer,
        max_length=max_length,
        padding_side=padding_side,
        allow_multi_token=allow_multi_token,
        source=source,
    )
