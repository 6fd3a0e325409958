"""Text classification with a causal LM as prompt + verbaliser (SST-2, CB, RTE), the setting of MeZO and DeComFL.

An example is rendered into a prompt; the model's next-token logits at the last prompt position, restricted to one
token per class (the verbaliser), are the class logits. Loss is cross-entropy over those few logits, as in MeZO's
classification objective (Malladi et al. 2023, arXiv 2305.17333) and DeComFL's LLM experiments (arXiv 2405.15861),
which restrict the last-position logits to the verbaliser token ids.

Templates (``TEMPLATES[task][name]``; ``"mezo"``, the default, is MeZO's ``large_models/templates.py``, which
takes CB and RTE from PromptSource; ``"gpt3"`` is the GPT-3 paper's question/answer style):

* sst2/mezo: ``{sentence} It was`` -> " terrible" | " great"
* cb/mezo: ``Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\\n`` -> "Yes" | "No" | "Maybe"
* cb/gpt3: ``{premise}\\nQuestion: {hypothesis} True, False, or Neither?\\nAnswer:`` -> " True" | " False" | " Neither"
* rte/mezo: ``{premise}\\nDoes this mean that "{hypothesis}" is true? Yes or No?\\n`` -> "Yes" | "No"
* rte/gpt3: ``{premise}\\nQuestion: {hypothesis} True or False?\\nAnswer:`` -> " True" | " False"

Labels are SST-2 (negative, positive), CB (entailment, contradiction, neutral), RTE (entailment, not_entailment):
the Hugging Face ``ClassLabel`` orders, so a verbaliser lists one word per label in that order. Fields are stripped
of surrounding whitespace before rendering (GLUE's SST-2 sentences end with a space; MeZO strips them too).

Data comes from a local folder in the layout of the project's shared data (``sst2/train.tsv`` + ``dev.tsv`` with a
``sentence\\tlabel`` header; ``cb`` and ``rte`` as ``train.jsonl`` + ``val.jsonl`` with string labels), or, where a
hub is reachable and the ``datasets`` library is installed, from the Hugging Face datasets ``glue/sst2``,
``super_glue/cb`` and ``super_glue/rte`` (integer labels, normalised through the dataset's label names; ``hf_path``
and ``hf_config`` name another copy, e.g. a mirror with plain data files for ``datasets`` releases that no longer run
loading scripts).
"""

from __future__ import annotations

from ..base import accuracy, classification_loss, evaluate
from .data import (
    DATA_DIR_ENV,
    TASK_SPECS,
    TextExample,
    TextExamples,
    TextTaskSpec,
    examples_from_records,
    load_text_examples,
)
from .logits import _FAST_PATH_OK, TextBatch, _full_logits, encode_prompts, verbalizer_logits, verbalizer_token_ids  # noqa: F401
from .prompts import TEMPLATES, PromptTemplate
from .task import TextClassificationTask, load_text_task

__all__ = [
    "DATA_DIR_ENV",
    "TASK_SPECS",
    "TEMPLATES",
    "PromptTemplate",
    "TextBatch",
    "TextClassificationTask",
    "TextExample",
    "TextExamples",
    "TextTaskSpec",
    "accuracy",
    "classification_loss",
    "encode_prompts",
    "evaluate",
    "examples_from_records",
    "load_text_examples",
    "load_text_task",
    "verbalizer_logits",
    "verbalizer_token_ids",
]
