"""Prompt templates: an example's fields rendered into a prompt, plus one verbaliser word per class (classification)
or one continuation per choice (multiple choice).

A pattern is a ``str.format`` string over the example's fields, with optional filters after a bar:
``{question|question}``, ``{span2_text|lower}``. The filters are the small text edits MeZO's templates make
(``large_models/templates.py``, arXiv 2305.17333):

* ``lower``, ``upper``, ``strip``
* ``capitalize``: first character upper-cased, the rest unchanged
* ``question``: "?" appended unless present, first character upper-cased (MeZO's BoolQ)
* ``nodot``: trailing whitespace and one trailing "." removed (MeZO's COPA premise)
* ``lowerfirst``: the first word lower-cased unless it is "I" (MeZO's COPA choices, ``capitalization="correct"``)

Format strings rather than Jinja (which PromptSource uses): the verbaliser token is resolved in the context of the
template's literal tail (:attr:`PromptTemplate.answer_context`), which a format string gives directly.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .data import TextExample


def _question(text: str) -> str:
    text = text if text.endswith("?") else text + "?"
    return text[:1].upper() + text[1:]


def _nodot(text: str) -> str:
    text = text.rstrip()
    return text[:-1] if text.endswith(".") else text


def _lowerfirst(text: str) -> str:
    words = text.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


#: the filters a pattern may apply to a field (``{field|filter|filter}``)
FILTERS: dict[str, Callable[[str], str]] = {
    "lower": str.lower,
    "upper": str.upper,
    "strip": str.strip,
    "capitalize": lambda s: s[:1].upper() + s[1:],
    "question": _question,
    "nodot": _nodot,
    "lowerfirst": _lowerfirst,
}


class _Formatter(string.Formatter):
    """``str.format`` whose field names may carry ``|filter`` suffixes."""

    def get_field(self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, str]:
        name, *filters = field_name.split("|")
        value, key = super().get_field(name, args, kwargs)
        for f in filters:
            value = FILTERS[f](str(value))
        return value, key


_FORMATTER = _Formatter()


def pattern_fields(pattern: str) -> tuple[str, ...]:
    """The field names a pattern uses (without filters), in order; checks its syntax and filter names."""
    try:
        parts = list(string.Formatter().parse(pattern))
    except ValueError as exc:
        raise ValueError(f"bad template pattern {pattern!r}: {exc}") from None
    names = []
    for _, field, _, _ in parts:
        if field is None:
            continue
        name, *filters = field.split("|")
        if not name or not name.isidentifier():
            raise ValueError(f"bad field {{{field}}} in pattern {pattern!r}: use {{name}} or {{name|filter}}")
        unknown = [f for f in filters if f not in FILTERS]
        if unknown:
            raise ValueError(f"unknown filter(s) {unknown} in pattern {pattern!r}; known: {sorted(FILTERS)}")
        names.append(name)
    return tuple(names)


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt pattern and either one verbaliser word per class or one choice pattern per class.

    A verbaliser word includes the whitespace that joins it to the prompt (" great" after "It was"; "Yes" after a
    newline), because that is how the model would write it next. Choice patterns likewise start with the text that
    joins them to the prompt (COPA: ``" {choice1|lowerfirst}"`` after ``"... because"``).
    """

    name: str
    pattern: str
    verbalizer: tuple[str, ...] = ()
    source: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "verbalizer", tuple(self.verbalizer))
        object.__setattr__(self, "choices", tuple(self.choices))
        if bool(self.verbalizer) == bool(self.choices):
            raise ValueError(f"template {self.name!r}: give either verbalizer words or choice patterns (not both)")
        for p in (self.pattern, *self.choices):
            pattern_fields(p)

    @property
    def multiple_choice(self) -> bool:
        return bool(self.choices)

    @property
    def num_classes(self) -> int:
        return len(self.choices or self.verbalizer)

    @functools.cached_property
    def field_names(self) -> tuple[str, ...]:
        names = [n for p in (self.pattern, *self.choices) for n in pattern_fields(p)]
        return tuple(dict.fromkeys(names))

    @property
    def answer_context(self) -> str:
        """The literal text after the last field: the context the verbaliser word follows in every prompt.

        Verbaliser token ids are resolved in this context, so tokenizers that encode a word differently at the start
        of a text (SentencePiece's dummy prefix) than after other text still get the id the model actually predicts.
        """
        parts = list(string.Formatter().parse(self.pattern))
        literal, field_name, _, _ = parts[-1]
        return literal if field_name is None else ""

    def _format(self, pattern: str, example: TextExample) -> str:
        try:
            return _FORMATTER.vformat(pattern, (), example.fields)
        except KeyError as exc:
            raise ValueError(
                f"template {self.name!r} needs field {exc.args[0]!r}; the example has {sorted(example.fields)}"
            ) from None

    def render(self, example: TextExample) -> str:
        """The prompt for ``example`` (without the answer)."""
        return self._format(self.pattern, example)

    def render_choices(self, example: TextExample) -> tuple[str, ...]:
        """The continuation of the prompt for each choice (multiple-choice templates)."""
        return tuple(self._format(c, example) for c in self.choices)
