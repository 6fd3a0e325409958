"""The text task (prompt + verbaliser classification, or multiple choice) on top of the spec, data, prompts and
logits modules; :func:`load_text_task` builds one from a spec, a registered name or a spec file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..base import ClassificationTask, batch_order
from .choices import ChoiceBatch, encode_choices
from .data import TextExample, TextExamples, load_text_examples
from .logits import PaddingSide, TextBatch, _encode, encode_prompts, verbalizer_token_ids
from .prompts import PromptTemplate
from .registry import get_spec
from .spec import TextTaskSpec


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
        self.spec.check_template(self.template)
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {self.max_length!r}")
        if self.tokenizer is not None:
            self.set_tokenizer(self.tokenizer)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.spec.name

    @property
    def label_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.spec.label_names

    @property
    def multiple_choice(self) -> bool:
        return self.template.multiple_choice

    def set_tokenizer(self, tokenizer: Any) -> TextClassificationTask:
        """Bind a tokenizer and resolve (and check) the verbaliser token ids for it (classification templates)."""
        probe = _encode(tokenizer, "x", add_special_tokens=True)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None and probe and probe[-1] == eos:
            raise ValueError(
                "the tokenizer appends EOS to every text; the last prompt position would be EOS, not the prompt's "
                "end. Load it with add_eos_token=False."
            )
        if not self.multiple_choice:
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
        if self.multiple_choice:
            raise AttributeError(f"task {self.name!r} is multiple choice: it has no verbaliser")
        if self._verbalizer_ids is None:
            raise RuntimeError(f"task {self.name!r} has no tokenizer: pass tokenizer= or call set_tokenizer()")
        return list(self._verbalizer_ids)

    def prompt(self, example: TextExample) -> str:
        return self.template.render(example)

    def choices(self, example: TextExample) -> tuple[str, ...]:
        """The continuation of the prompt for each class (multiple-choice tasks)."""
        return self.template.render_choices(example)

    def eval_batches(self, batch_size: int) -> list[TextBatch | ChoiceBatch]:  # type: ignore[override]
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
    ) -> list[TextBatch | ChoiceBatch]:  # type: ignore[override]
        """See :meth:`ClassificationTask.make_batches`; ``sort_by_length`` batches prompts of similar length
        together (less padding: for evaluation, where order does not matter; not with ``shuffle``).
        Classification templates give :class:`TextBatch`es, multiple-choice ones :class:`ChoiceBatch`es."""
        if self.tokenizer is None:
            raise RuntimeError(f"task {self.name!r} has no tokenizer: pass tokenizer= or call set_tokenizer()")
        verbalizer_ids = None if self.multiple_choice else self.verbalizer_ids
        if sort_by_length and shuffle:
            raise ValueError("sort_by_length and shuffle exclude each other")
        prompts = [self.prompt(ex) for ex in examples]
        order = np.argsort([len(p) for p in prompts], kind="stable") if sort_by_length else np.arange(len(prompts))
        batches: list[TextBatch | ChoiceBatch] = []
        for idx in batch_order(len(examples), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last):
            chosen = order[idx]
            labels = [examples[int(i)].label for i in chosen]
            if verbalizer_ids is None:
                batches.append(encode_choices(self.tokenizer, [prompts[i] for i in chosen],
                                              [self.choices(examples[int(i)]) for i in chosen], labels,
                                              max_length=self.max_length))
                continue
            batches.append(
                encode_prompts(
                    self.tokenizer,
                    [prompts[i] for i in chosen],
                    labels,
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
    name: str | os.PathLike[str] | TextTaskSpec,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    tokenizer: Any = None,
    template: str | PromptTemplate | None = None,
    max_length: int | None = None,
    padding_side: PaddingSide = "right",
    num_train: int | None = None,
    num_eval: int | None = None,
    seed: int = 0,
    allow_multi_token: bool = False,
    hf_path: str | None = None,
    hf_config: str | None = None,
    cache_dir: str | None = None,
) -> TextClassificationTask:
    """Load a text task as a :class:`TextClassificationTask`.

    ``name``: a registered task (``"boolq"``, ``"SST-2"``: any case, "-"/"_" ignored), a spec TOML file, or a
    :class:`TextTaskSpec`. Data: see :func:`load_text_examples`. ``template``: a name from the spec (default its
    ``default_template``) or a :class:`PromptTemplate`; ``max_length`` defaults to the spec's.
    ``num_train``/``num_eval`` keep a random subset (deterministic in ``seed``).
    """
    spec = name if isinstance(name, TextTaskSpec) else get_spec(name)
    chosen = spec.template(template)
    train, eval_, source = load_text_examples(spec, data_dir, hf_path=hf_path, hf_config=hf_config, cache_dir=cache_dir)
    train = _subsample(train, num_train, np.random.default_rng([seed, 0]))
    eval_ = _subsample(eval_, num_eval, np.random.default_rng([seed, 1]))
    return TextClassificationTask(
        spec=spec,
        template=chosen,
        train_examples=train,
        eval_examples=eval_,
        tokenizer=tokenizer,
        max_length=spec.max_length if max_length is None else max_length,
        padding_side=padding_side,
        allow_multi_token=allow_multi_token,
        source=source,
    )
