"""Text tasks with a causal LM, the setting of MeZO (arXiv 2305.17333) and DeComFL (arXiv 2405.15861), declared as
data: each task is a :class:`TextTaskSpec` (a TOML file; the built-in ones are ``hiso/tasks/specs/*.toml``) naming
its data files or hub dataset, fields, labels (strings, integers or booleans), prompt templates and scoring mode.

* **verbaliser classification** (SST-2, CB, RTE, BoolQ, WiC, WSC, MultiRC): the model's next-token logits at the
  last prompt position, restricted to one token per class, are the class logits; loss is cross-entropy over them.
* **multiple choice** (COPA): each class's continuation is appended to the prompt and scored by the mean
  log-probability of its tokens; loss is cross-entropy over those scores (MeZO's ``train_as_classification``).

Built-in templates (``"mezo"``, the default, is MeZO's ``large_models/templates.py``, which takes CB, RTE, WiC, WSC
and MultiRC from PromptSource; DeComFL uses the same except for BoolQ and SST-2's words, kept as ``"decomfl"``):

* sst2: ``{sentence} It was`` -> " terrible" | " great"
* cb: ``Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\\n`` -> "Yes" | "No" | "Maybe"
* rte: ``{premise}\\nDoes this mean that "{hypothesis}" is true? Yes or No?\\n`` -> "Yes" | "No"
* boolq: ``{passage} {question|question}\\n`` -> "No" | "Yes"
* wic: ``Does the word "{word}" have the same meaning in these two sentences? Yes, No?\\n{sentence1}\\n{sentence2}\\n``
  -> "No" | "Yes"
* wsc: ``{text}\\nIn the previous sentence, does the pronoun "{span2_text|lower}" refer to {span1_text}? Yes or
  No?\\n`` -> "No" | "Yes"
* multirc: ``{paragraph}\\nQuestion: {question}\\nI found this answer "{answer}". Is that correct? Yes or No?\\n``
  -> "No" | "Yes"
* copa: ``{premise|nodot}`` + " because" / " so" -> " {choice1|lowerfirst}" | " {choice2|lowerfirst}"

Data come from a local folder in the GLUE / SuperGLUE layout (``SST-2/train.tsv`` + ``dev.tsv``; ``BoolQ/``,
``CB/``, ``COPA/``, ``MultiRC/``, ``RTE/``, ``WiC/``, ``WSC/`` with ``train.jsonl`` + ``val.jsonl``; folder names
in any case), read with the ``datasets`` library, or from the Hugging Face hub (``glue/sst2``, ``super_glue/<task>``)
where one is reachable.
"""

from __future__ import annotations

from ..base import accuracy, classification_loss, evaluate
from .choices import ChoiceBatch, choice_scores, encode_choices
from .data import (
    DATA_DIR_ENV,
    TextExample,
    TextExamples,
    examples_from_records,
    label_index,
    load_text_examples,
    resolve_data,
)
from .logits import _FAST_PATH_OK, TextBatch, _full_logits, encode_prompts, verbalizer_logits, verbalizer_token_ids  # noqa: F401
from .prompts import FILTERS, PromptTemplate
from .registry import TASK_SPECS, TEMPLATES, find_spec, get_spec, is_spec_file, register_spec
from .spec import SCORING, FieldSource, TextTaskSpec, load_spec, spec_from_dict
from .task import TextClassificationTask, load_text_task

__all__ = [
    "DATA_DIR_ENV",
    "FILTERS",
    "SCORING",
    "TASK_SPECS",
    "TEMPLATES",
    "ChoiceBatch",
    "FieldSource",
    "PromptTemplate",
    "TextBatch",
    "TextClassificationTask",
    "TextExample",
    "TextExamples",
    "TextTaskSpec",
    "accuracy",
    "choice_scores",
    "classification_loss",
    "encode_choices",
    "encode_prompts",
    "evaluate",
    "examples_from_records",
    "find_spec",
    "get_spec",
    "is_spec_file",
    "label_index",
    "load_spec",
    "load_text_examples",
    "load_text_task",
    "register_spec",
    "resolve_data",
    "spec_from_dict",
    "verbalizer_logits",
    "verbalizer_token_ids",
]
