"""Prompt templates of the text tasks: an example's fields rendered into a prompt and one verbaliser word per class.

``TEMPLATES[task][name]``; ``"mezo"``, the default, is MeZO's ``large_models/templates.py`` (arXiv 2305.17333), which
takes CB and RTE from PromptSource; ``"gpt3"`` is the GPT-3 paper's question/answer style (see ``hiso.tasks.text``).
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .data import TextExample


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt pattern (``str.format`` over the example's fields) and one verbaliser word per class.

    A verbaliser word includes the whitespace that joins it to the prompt (" great" after "It was"; "Yes" after a
    newline), because that is how the model would write it next.
    """

    name: str
    pattern: str
    verbalizer: tuple[str, ...]
    source: str = ""

    @functools.cached_property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f for _, f, _, _ in string.Formatter().parse(self.pattern) if f is not None)

    @property
    def answer_context(self) -> str:
        """The literal text after the last field: the context the verbaliser word follows in every prompt.

        Verbaliser token ids are resolved in this context, so tokenizers that encode a word differently at the start
        of a text (SentencePiece's dummy prefix) than after other text still get the id the model actually predicts.
        """
        parts = list(string.Formatter().parse(self.pattern))
        literal, field_name, _, _ = parts[-1]
        return literal if field_name is None else ""

    def render(self, example: TextExample) -> str:
        """The prompt for ``example`` (without the answer)."""
        try:
            return self.pattern.format(**example.fields)
        except KeyError as exc:
            raise ValueError(
                f"template {self.name!r} needs field {exc.args[0]!r}; the example has {sorted(example.fields)}"
            ) from None


_MEZO = "MeZO (Malladi et al. 2023), large_models/templates.py"
_GPT3 = "GPT-3 (Brown et al. 2020) appendix G style, as in Zhao et al. 2021's few-shot-learning prompts"

TEMPLATES: dict[str, dict[str, PromptTemplate]] = {
    "sst2": {
        "mezo": PromptTemplate("mezo", "{sentence} It was", (" terrible", " great"), _MEZO),
    },
    "cb": {
        "mezo": PromptTemplate(
            "mezo",
            'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n',
            ("Yes", "No", "Maybe"),
            _MEZO,
        ),
        "gpt3": PromptTemplate(
            "gpt3",
            "{premise}\nQuestion: {hypothesis} True, False, or Neither?\nAnswer:",
            (" True", " False", " Neither"),
            _GPT3,
        ),
    },
    "rte": {
        "mezo": PromptTemplate(
            "mezo",
            '{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
            ("Yes", "No"),
            _MEZO,
        ),
        "gpt3": PromptTemplate(
            "gpt3", "{premise}\nQuestion: {hypothesis} True or False?\nAnswer:", (" True", " False"), _GPT3
        ),
    },
}
