"""A tiny causal LM folder for fast command-line and task tests: a word-level tokenizer over the words of the
SuperGLUE-layout fixtures (tests/data/superglue) and the built-in templates, and a 2-layer Llama with random
weights. Loads through ``hiso.models.load_causal_lm(folder)`` like any saved Hugging Face model."""

from __future__ import annotations

import re
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "superglue"


def vocabulary() -> list[str]:
    from hiso.tasks import TASK_SPECS

    text = [p.read_text(encoding="utf-8") for p in sorted(DATA.rglob("*")) if p.is_file()]
    for spec in TASK_SPECS.values():
        for t in spec.templates.values():
            text += [t.pattern, *t.verbalizer, *t.choices]
    words = sorted({w for chunk in text for w in re.findall(r"\w+|[^\w\s]+", chunk)})
    words += sorted({w.lower() for w in words} - set(words)) + sorted({w.capitalize() for w in words} - set(words))
    return words


def make_tiny_lm(folder: Path, seed: int = 0) -> Path:
    """Write the tokenizer and model to ``folder`` (created) and return it."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = vocabulary()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>", pad_token="</s>")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
