"""Text tasks without the real LM: loading the shared data (and hub-style rows), templates, labels, collation,
verbaliser resolution, and last-position logits on tiny random Hugging Face models."""

from __future__ import annotations

import os
import re
import sys
import types
import typing
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hiso.tasks import TEMPLATES, available_tasks, get_task
from hiso.tasks.base import Batch, Examples
from hiso.tasks.text import (
    DATA_DIR_ENV,
    TASK_SPECS,
    PromptTemplate,
    TextClassificationTask,
    TextExample,
    TextExamples,
    encode_prompts,
    examples_from_records,
    load_text_examples,
    verbalizer_token_ids,
)

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    folder = Path(os.environ.get(DATA_DIR_ENV) or REPO.parent / "shared" / "data")
    return folder if (folder / "sst2" / "dev.tsv").is_file() else None


needs_data = pytest.mark.skipif(
    shared_data_dir() is None, reason=f"shared task data absent (set {DATA_DIR_ENV} or provide <repo>/../shared/data)"
)


class WordTokenizer:
    """A deterministic stand-in for a Hugging Face tokenizer: one token per word with its leading whitespace
    (byte-level BPE style), ids assigned on first sight; optional BOS."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, add_bos: bool = False, add_eos: bool = False) -> None:
        self.add_bos, self.add_eos = add_bos, add_eos
        self.vocab: dict[str, int] = {}

    def _ids(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [self.vocab.setdefault(piece, 3 + len(self.vocab)) for piece in re.findall(r"\s*\S+|\s+", text)]
        if add_special_tokens:
            ids = ([self.bos_token_id] if self.add_bos else []) + ids + ([self.eos_token_id] if self.add_eos else [])
        return ids

    def __call__(self, text, add_special_tokens: bool = True):
        if isinstance(text, str):
            return {"input_ids": self._ids(text, add_special_tokens)}
        return {"input_ids": [self._ids(t, add_special_tokens) for t in text]}

    def convert_ids_to_tokens(self, i: int) -> str:
        return {v: k for k, v in self.vocab.items()}[i]


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(
    "name, n_train, n_eval, label_counts_eval",
    [("sst2", 67_349, 872, [428, 444]), ("cb", 250, 56, [23, 28, 5]), ("rte", 2_490, 277, [146, 131])],
)
def test_local_data_counts_and_labels(name, n_train, n_eval, label_counts_eval):
    train, eval_, source = load_text_examples(name, shared_data_dir())
    assert (len(train), len(eval_)) == (n_train, n_eval)
    assert Path(source) == shared_data_dir() / name
    assert np.bincount(eval_.labels).tolist() == label_counts_eval
    assert isinstance(train, Examples) and train.labels.dtype == np.int64
    for ex in (train[0], eval_[-1]):
        assert set(ex.fields) == set(TASK_SPECS[name].field_names)
        assert all(v == v.strip() and v for v in ex.fields.values())


@needs_data
def test_data_dir_forms_and_env(monkeypatch):
    root = shared_data_dir()
    # the task folder itself, the root, and the environment variable all work
    assert len(load_text_examples("cb", root / "cb")[1]) == 56
    monkeypatch.setenv(DATA_DIR_ENV, str(root))
    task = get_task("cb")
    assert task.source == str(root / "cb") and len(task.eval_examples) == 56


@needs_data
def test_first_rows_match_files():
    root = shared_data_dir()
    _, eval_, _ = load_text_examples("sst2", root)
    assert eval_[0].fields["sentence"] == "it 's a charming and often affecting journey ."  # trailing space stripped
    assert eval_[0].label == 1 and eval_[1].label == 0
    cb_train, _, _ = load_text_examples("cb", root)
    first = cb_train[0]
    assert first.uid == "0" and TASK_SPECS["cb"].label_names[first.label] in ("entailment", "contradiction", "neutral")


@needs_data
def test_subsets_are_deterministic():
    a = get_task("rte", shared_data_dir(), num_train=100, num_eval=20, seed=3)
    b = get_task("rte", shared_data_dir(), num_train=100, num_eval=20, seed=3)
    c = get_task("rte", shared_data_dir(), num_train=100, num_eval=20, seed=4)
    assert [e.uid for e in a.train_examples] == [e.uid for e in b.train_examples]
    assert [e.uid for e in a.train_examples] != [e.uid for e in c.train_examples]
    assert len(a.train_examples) == 100 and len(a.eval_examples) == 20
    uids = [int(e.uid) for e in a.train_examples]
    assert uids == sorted(uids)  # kept in file order


def test_hub_rows_are_normalised_through_label_names():
    spec = TASK_SPECS["cb"]
    rows = [{"premise": "p ", "hypothesis": " h", "label": i, "idx": i} for i in range(3)]
    ex = examples_from_records(spec, rows, hf_label_names=["entailment", "contradiction", "neutral"])
    assert ex.labels.tolist() == [0, 1, 2] and ex[0].fields == {"premise": "p", "hypothesis": "h"}
    # a source that orders its classes differently still lands on the right names
    ex = examples_from_records(spec, rows, hf_label_names=["neutral", "entailment", "contradiction"])
    assert [spec.label_names[i] for i in ex.labels] == ["neutral", "entailment", "contradiction"]
    rte = examples_from_records(TASK_SPECS["rte"], [{"premise": "a", "hypothesis": "b", "label": "not_entailment"}])
    assert rte.labels.tolist() == [1]


def test_hub_path_with_a_stand_in_datasets_module(monkeypatch):
    calls = []

    class Split(list):
        features: typing.ClassVar = {"label": types.SimpleNamespace(names=["negative", "positive"])}

    def load_dataset(path, config, split, cache_dir=None):
        calls.append((path, config, split))
        return Split([{"idx": 0, "sentence": "good ", "label": 1}, {"idx": 1, "sentence": "bad", "label": 0}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    task = get_task("sst2", tokenizer=None)
    assert calls == [("glue", "sst2", "train"), ("glue", "sst2", "validation")]
    assert task.source == "hub:glue/sst2" and task.train_labels.tolist() == [1, 0]


def test_no_data_and_no_datasets_library_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(ImportError, match=f"data_dir=.*{DATA_DIR_ENV}.*pip install datasets"):
        get_task("rte")


def test_bad_data(tmp_path):
    spec = TASK_SPECS["cb"]
    with pytest.raises(ValueError, match="unknown cb label 'maybe'"):
        examples_from_records(spec, [{"premise": "a", "hypothesis": "b", "label": "maybe"}])
    with pytest.raises(ValueError, match="unlabelled"):
        examples_from_records(spec, [{"premise": "a", "hypothesis": "b", "label": -1}])
    with pytest.raises(ValueError, match="out of range"):
        examples_from_records(spec, [{"premise": "a", "hypothesis": "b", "label": 3}])
    with pytest.raises(TypeError, match="class name, an integer or a boolean"):
        examples_from_records(spec, [{"premise": "a", "hypothesis": "b", "label": 1.0}])
    with pytest.raises(ValueError, match=r"missing field 'hypothesis'"):
        examples_from_records(spec, [{"premise": "a", "label": 0}])
    with pytest.raises(ValueError, match="no examples"):
        examples_from_records(spec, [])
    with pytest.raises(FileNotFoundError, match=r"train\.jsonl and val\.jsonl/validation\.jsonl/dev\.jsonl"):
        load_text_examples("cb", tmp_path)
    (tmp_path / "cb").mkdir()
    (tmp_path / "cb" / "train.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "neutral"}\n{oops\n')
    (tmp_path / "cb" / "val.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"train.jsonl: could not be read as JSON"):
        load_text_examples("cb", tmp_path)
    (tmp_path / "cb" / "train.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "neutral"}\n')
    with pytest.raises(ValueError, match=r"val.jsonl: empty file"):
        load_text_examples("cb", tmp_path)
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("sentence\tlabel\nfine\t1\nbroken\t1\t7\n")
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\nok\t0\n")
    with pytest.raises(ValueError, match=r"train.tsv: could not be read as CSV"):
        load_text_examples("sst2", tmp_path)
    with pytest.raises(ValueError, match="unknown task 'mnli'"):
        get_task("mnli")
    assert available_tasks() == ["boolq", "cb", "copa", "fashion_mnist", "multirc", "rte", "sst2", "wic", "wsc"]


# --------------------------------------------------------------------------------------------------------------------
# Templates and verbalisers
# --------------------------------------------------------------------------------------------------------------------


def test_templates_render_as_documented():
    sst = TextExample({"sentence": "a gorgeous film ."}, 1)
    nli = TextExample({"premise": "It rained.", "hypothesis": "the ground is wet"}, 0)
    assert TEMPLATES["sst2"]["mezo"].render(sst) == "a gorgeous film . It was"
    assert TEMPLATES["cb"]["mezo"].render(nli) == (
        'Suppose It rained. Can we infer that "the ground is wet"? Yes, No, or Maybe?\n'
    )
    assert TEMPLATES["cb"]["gpt3"].render(nli) == (
        "It rained.\nQuestion: the ground is wet True, False, or Neither?\nAnswer:"
    )
    assert TEMPLATES["rte"]["mezo"].render(nli) == (
        'It rained.\nDoes this mean that "the ground is wet" is true? Yes or No?\n'
    )
    assert TEMPLATES["sst2"]["mezo"].verbalizer == (" terrible", " great")
    assert TEMPLATES["cb"]["mezo"].verbalizer == ("Yes", "No", "Maybe")
    assert TEMPLATES["rte"]["mezo"].verbalizer == ("Yes", "No")
    assert TEMPLATES["sst2"]["mezo"].answer_context == " It was"
    assert TEMPLATES["rte"]["mezo"].answer_context == '" is true? Yes or No?\n'
    with pytest.raises(ValueError, match="needs field 'premise'"):
        TEMPLATES["cb"]["mezo"].render(sst)


def test_verbalizer_token_ids_checks():
    tok = WordTokenizer()
    ids = verbalizer_token_ids(tok, [" terrible", " great"], context=" It was")
    assert len(set(ids)) == 2
    assert ids == [tok(" terrible", add_special_tokens=False)["input_ids"][0], tok.vocab[" great"]]
    with pytest.raises(ValueError, match="2 tokens"):
        verbalizer_token_ids(tok, [" very good", " bad"], context=" It was")
    first = verbalizer_token_ids(tok, [" very good", " bad"], context=" It was", allow_multi_token=True)
    assert first == [tok.vocab[" very"], tok.vocab[" bad"]]
    with pytest.raises(ValueError, match="distinct"):
        verbalizer_token_ids(tok, [" very good", " very bad"], context=" It was", allow_multi_token=True)
    with pytest.raises(ValueError, match="merges"):
        verbalizer_token_ids(tok, ["great"], context=" It was")  # "wasgreat" is one word
    with pytest.raises(ValueError, match="empty"):
        verbalizer_token_ids(tok, [])


def _toy_task(tok, *, padding_side="right", max_length=512) -> TextClassificationTask:
    sentences = ["a b c", "d", "e f g h i", "j k", "l m n"]
    examples = TextExamples(tuple(TextExample({"sentence": s}, i % 2, str(i)) for i, s in enumerate(sentences)))
    return TextClassificationTask(
        spec=TASK_SPECS["sst2"],
        template=TEMPLATES["sst2"]["mezo"],
        train_examples=examples,
        eval_examples=examples,
        tokenizer=tok,
        padding_side=padding_side,
        max_length=max_length,
    )


def test_task_needs_a_tokenizer_and_rejects_eos_appending_ones():
    task = _toy_task(None)
    with pytest.raises(RuntimeError, match="no tokenizer"):
        task.make_batches(task.train_examples, 2)
    with pytest.raises(ValueError, match="appends EOS"):
        task.set_tokenizer(WordTokenizer(add_eos=True))
    with pytest.raises(ValueError, match="3 verbaliser words for 2 labels"):
        TextClassificationTask(
            TASK_SPECS["sst2"],
            PromptTemplate("x", "{sentence}", ("a", "b", "c")),
            task.train_examples,
            task.train_examples,
        )
    with pytest.raises(ValueError, match="unknown template 'gpt3' for sst2"):
        get_task("sst2", data_dir=shared_data_dir() or ".", template="gpt3")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collation_padding_and_last_index(padding_side):
    tok = WordTokenizer(add_bos=True)
    task = _toy_task(tok, padding_side=padding_side)
    batches = task.make_batches(task.train_examples, 2)
    assert [len(b) for b in batches] == [2, 2, 1]
    assert all(isinstance(b, Batch) for b in batches)
    b = batches[0]  # "a b c It was" (6 tokens with BOS) and "d It was" (4)
    assert b.input_ids.shape == (2, 6) and b.labels.tolist() == [0, 1]
    assert b.attention_mask.sum(1).tolist() == [6, 4]
    rows = torch.arange(2)
    last_tokens = b.input_ids[rows, b.last_index]
    assert (last_tokens == tok.vocab[" was"]).all()  # every prompt's last real token
    assert (b.input_ids[b.attention_mask == 0] == tok.pad_token_id).all()
    assert (b.input_ids[rows, (b.attention_mask.argmax(1))] == tok.bos_token_id).all()
    assert b.verbalizer_ids.tolist() == task.verbalizer_ids


def test_left_truncation_keeps_bos_and_the_end():
    tok = WordTokenizer(add_bos=True)
    batch = encode_prompts(tok, ["one two three four five six It was"], [1], [5, 6], max_length=4)
    assert batch.input_ids[0].tolist() == [1, tok.vocab[" six"], tok.vocab[" It"], tok.vocab[" was"]]
    with pytest.raises(ValueError, match="padding_side"):
        encode_prompts(tok, ["x"], [0], [5, 6], padding_side="middle")
    with pytest.raises(ValueError, match="1 prompts but 2 labels"):
        encode_prompts(tok, ["x"], [0, 1], [5, 6])


def test_shuffled_batches_are_deterministic_and_complete():
    task = _toy_task(WordTokenizer())
    a = task.make_batches(task.train_examples, 2, shuffle=True, seed=7)
    b = task.make_batches(task.train_examples, 2, shuffle=True, seed=7)
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b, strict=True))
    assert sorted(torch.cat([x.labels for x in a]).tolist()) == [0, 0, 0, 1, 1]
    assert len(task.make_batches(task.train_examples, 2, drop_last=True)) == 2


# --------------------------------------------------------------------------------------------------------------------
# Last-position logits on tiny random models
# --------------------------------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _tiny(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **common))
    elif kind == "gemma2-softcap":  # its head soft-caps logits after the LM head: the shortcut must notice
        config = transformers.Gemma2Config(num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.05, **common)
        model = transformers.Gemma2ForCausalLM(config)
    elif kind == "gpt2":  # absolute positions: left padding needs position ids
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64)
        config.bos_token_id = config.eos_token_id = 2
        model = transformers.GPT2LMHeadModel(config)
    else:
        raise AssertionError(kind)
    return model.eval()


def _tiny_batch(padding_side="right"):
    tok = WordTokenizer()
    task = _toy_task(tok, padding_side=padding_side)
    assert max(tok.vocab.values()) < 64
    return task, task.make_batches(task.train_examples, 5)[0]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shortcut_matches_full_logits_and_padding_sides_agree(kind):
    from hiso.tasks.text import _FAST_PATH_OK, _full_logits

    model = _tiny(kind)
    task, right = _tiny_batch("right")
    _, left = _tiny_batch("left")
    with torch.no_grad():
        got = right.class_logits(model)
        assert _FAST_PATH_OK[model] is True
        full = _full_logits(
            model, right.input_ids, right.attention_mask, right.last_index, right.verbalizer_ids, "right"
        )
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(left.class_logits(model), got, rtol=1e-4, atol=1e-5)
        # each row equals the prompt run alone: padding does not leak into the answer position
        single = task.make_batches(task.train_examples.subset([2]), 1)[0].class_logits(model)
        torch.testing.assert_close(single[0], got[2], rtol=1e-4, atol=1e-5)
    assert got.shape == (5, 2) and got.dtype == torch.float32


def test_softcapped_head_falls_back_to_full_logits():
    from hiso.tasks.text import _FAST_PATH_OK, _full_logits

    model = _tiny("gemma2-softcap")
    _, batch = _tiny_batch()
    with pytest.warns(UserWarning, match="computing full logits"), torch.no_grad():
        got = batch.class_logits(model)
    assert _FAST_PATH_OK[model] is False
    full = _full_logits(model, batch.input_ids, batch.attention_mask, batch.last_index, batch.verbalizer_ids, "right")
    torch.testing.assert_close(got, full.detach())
    assert got.abs().max() <= 0.05 + 1e-6  # soft-capped


def test_loss_and_accuracy_interface_without_grad_and_with_grad():
    model = _tiny("llama")
    task, batch = _tiny_batch()
    with torch.no_grad():
        loss = task.loss(model, batch)
        acc = task.accuracy(model, [batch])
    assert loss.ndim == 0 and torch.isfinite(loss) and not loss.requires_grad
    assert 0.0 <= acc <= 1.0
    # first-order baselines can backpropagate through the same loss
    task.loss(model, batch).backward()
    assert model.lm_head.weight.grad is not None


def test_plain_module_without_hf_structure_uses_its_forward():
    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(64, 64)

        def forward(self, input_ids, attention_mask):
            return types.SimpleNamespace(logits=self.emb(input_ids))

    model = Bag()
    _, batch = _tiny_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits = batch.class_logits(model)
    expected = model.emb.weight[batch.input_ids[torch.arange(5), batch.last_index]][:, batch.verbalizer_ids]
    torch.testing.assert_close(logits, expected)


def test_eval_batches_bucket_by_length():
    task = _toy_task(WordTokenizer())
    plain = task.make_batches(task.eval_examples, 2)
    bucketed = task.eval_batches(2)
    assert sorted(torch.cat([b.labels for b in bucketed]).tolist()) == sorted(task.eval_examples.labels.tolist())
    padded = [int((b.attention_mask == 0).sum()) for b in bucketed]
    assert sum(padded) < sum(int((b.attention_mask == 0).sum()) for b in plain)
    lengths = [int(n) for b in bucketed for n in b.attention_mask.sum(1)]
    assert lengths == sorted(lengths)
    with pytest.raises(ValueError, match="exclude"):
        task.make_batches(task.eval_examples, 2, shuffle=True, sort_by_length=True)
