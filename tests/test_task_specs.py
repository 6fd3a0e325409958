"""Text tasks as data: the shipped specs, the SuperGLUE layouts (fixtures in tests/data/superglue: BoolQ, WiC, COPA,
WSC, MultiRC with the field names and label types SuperGLUE distributes), prompts equal to MeZO's templates, labels
as strings / integers / booleans, hub-style flat rows, user specs, and multiple-choice scoring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hiso.tasks import TASK_SPECS, available_tasks, get_task, register_task_spec, task_info
from hiso.tasks.text import (
    DATA_DIR_ENV,
    ChoiceBatch,
    TextBatch,
    choice_scores,
    encode_choices,
    examples_from_records,
    label_index,
    load_spec,
    load_text_examples,
    spec_from_dict,
)
from hiso.tasks.text.registry import TEMPLATES

FIXTURES = Path(__file__).resolve().parent / "data" / "superglue"


def rows(task: str, split: str) -> list[dict]:
    folder = {"boolq": "BoolQ", "wic": "WiC", "copa": "COPA", "wsc": "WSC", "multirc": "MultiRC"}[task]
    return [json.loads(line) for line in (FIXTURES / folder / split).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- MeZO's templates
# The reference: MeZO's large_models/templates.py (arXiv 2305.17333) re-stated on the raw SuperGLUE rows.
def mezo_boolq(r):  # BoolQTemplateV3, the default of BoolQDataset.get_template
    q = r["question"] if r["question"].endswith("?") else r["question"] + "?"
    return f"{r['passage']} {q[0].upper() + q[1:]}\n", ["No", "Yes"]


def mezo_wic(r):
    return (f'Does the word "{r["word"]}" have the same meaning in these two sentences? Yes, No?\n'
            f"{r['sentence1']}\n{r['sentence2']}\n"), ["No", "Yes"]


def mezo_wsc(r):
    t = r["target"]
    return (f'{r["text"]}\nIn the previous sentence, does the pronoun "{t["span2_text"].lower()}" refer to '
            f'{t["span1_text"]}? Yes or No?\n'), ["No", "Yes"]


def mezo_copa(r):  # CopaTemplate: encode() stripped of spaces is the prompt, verbalize() the prompt + choice
    premise = r["premise"].rstrip()
    premise = premise[:-1] if premise.endswith(".") else premise
    prompt = premise + {"cause": " because ", "effect": " so "}[r["question"]]

    def cap(c):
        words = c.split(" ")
        words[0] = words[0] if words[0] == "I" else words[0].lower()
        return " ".join(words)

    return prompt.strip(" "), [(prompt + cap(r[k])).strip(" ") for k in ("choice1", "choice2")]


def mezo_multirc(p, q, a):
    return f'{p}\nQuestion: {q}\nI found this answer "{a}". Is that correct? Yes or No?\n', ["No", "Yes"]


@pytest.mark.parametrize("task", ["boolq", "wic", "wsc", "copa"])
def test_prompts_equal_mezos_templates_on_every_row(task):
    t = get_task(task, FIXTURES)
    for split, examples in (("train.jsonl", t.train_examples), ("val.jsonl", t.eval_examples)):
        raw = rows(task, split)
        assert len(raw) == len(examples)
        for r, ex in zip(raw, examples, strict=True):
            prompt, answers = {"boolq": mezo_boolq, "wic": mezo_wic, "wsc": mezo_wsc, "copa": mezo_copa}[task](r)
            assert t.prompt(ex) == prompt
            if t.multiple_choice:
                assert [t.prompt(ex) + c for c in t.choices(ex)] == answers
            else:
                assert list(t.template.verbalizer) == answers
            assert ex.label == int(r["label"])  # JSON false / 0 -> class 0, true / 1 -> class 1


def test_multirc_is_flattened_to_one_example_per_answer():
    t = get_task("multirc", FIXTURES)
    expected = []
    for r in rows("multirc", "train.jsonl"):
        for q in r["passage"]["questions"]:
            for a in q["answers"]:
                expected.append((mezo_multirc(r["passage"]["text"], q["question"], a["text"])[0], a["label"],
                                 f"{r['idx']}/{q['idx']}/{a['idx']}"))
    got = [(t.prompt(ex), ex.label, ex.uid) for ex in t.train_examples]
    assert got == expected and len(got) == 10


def test_hub_style_flat_rows_give_the_same_examples():
    """Hugging Face's super_glue flattens WSC's target and MultiRC's nesting and gives ClassLabel integers."""
    wsc = TASK_SPECS["wsc"]
    flat = [{**{k: v for k, v in r.items() if k != "target"}, **r["target"], "label": int(r["label"])}
            for r in rows("wsc", "val.jsonl")]
    local = load_text_examples(wsc, FIXTURES)[1]
    hub = examples_from_records(wsc, flat, hf_label_names=["False", "True"])
    assert [(e.fields, e.label) for e in hub] == [(e.fields, e.label) for e in local]
    mrc = TASK_SPECS["multirc"]
    flat = [{"paragraph": r["passage"]["text"], "question": q["question"], "answer": a["text"],
             "idx": {"paragraph": r["idx"], "question": q["idx"], "answer": a["idx"]}, "label": a["label"]}
            for r in rows("multirc", "val.jsonl") for q in r["passage"]["questions"] for a in q["answers"]]
    hub = examples_from_records(mrc, flat, hf_label_names=["False", "True"])
    local = load_text_examples(mrc, FIXTURES)[1]
    assert [(e.fields, e.label) for e in hub] == [(e.fields, e.label) for e in local]
    boolq = [{"question": r["question"], "passage": r["passage"], "answer": r["label"]} for r in rows("boolq",
                                                                                                   "val.jsonl")]
    assert examples_from_records(TASK_SPECS["boolq"], boolq).labels.tolist() == \
        load_text_examples("boolq", FIXTURES)[1].labels.tolist()


def test_label_forms():
    boolq, copa, cb = TASK_SPECS["boolq"], TASK_SPECS["copa"], TASK_SPECS["cb"]
    assert [label_index(v, boolq) for v in (False, True, "true", "False", 0, 1, "1")] == [0, 1, 1, 0, 0, 1, 1]
    assert label_index(1, copa) == 1 and label_index("choice2", copa) == 1
    assert label_index(0, cb, hf_label_names=["neutral", "entailment", "contradiction"]) == 2
    with pytest.raises(ValueError, match="unlabelled"):
        label_index(-1, copa)
    with pytest.raises(ValueError, match="out of range"):
        label_index(2, copa)
    with pytest.raises(ValueError, match="unknown boolq label 'maybe'"):
        label_index("maybe", boolq)
    with pytest.raises(ValueError, match="missing label"):
        examples_from_records(boolq, [{"question": "q", "passage": "p"}])  # SuperGLUE's test split


def test_folder_names_ignore_case_and_the_task_folder_itself_works(tmp_path, monkeypatch):
    shutil.copytree(FIXTURES / "WiC", tmp_path / "WIC")
    shutil.copytree(FIXTURES / "SST-2", tmp_path / "sst_2")
    assert load_text_examples("wic", tmp_path)[2] == str(tmp_path / "WIC")
    assert load_text_examples("SST-2", tmp_path)[2] == str(tmp_path / "sst_2")
    assert len(load_text_examples("wic", tmp_path / "WIC")[0]) == 10
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert get_task("WiC").source == str(tmp_path / "WIC")
    with pytest.raises(FileNotFoundError, match="sub-folder named wic"):
        load_text_examples("wic", tmp_path / "sst_2")


def test_builtin_specs():
    assert {"sst2", "cb", "rte", "boolq", "wic", "wsc", "multirc", "copa"} <= set(available_tasks())
    for name in ("sst2", "cb", "rte", "boolq", "wic", "wsc", "multirc", "copa"):
        spec = TASK_SPECS[name]
        assert spec.default_template == "mezo" and "MeZO" in spec.templates["mezo"].source
        assert spec.hf_path in ("glue", "super_glue") and TEMPLATES[name] == dict(spec.templates)
        assert task_info(name).takes_model
    assert TASK_SPECS["copa"].multiple_choice and not TASK_SPECS["boolq"].multiple_choice
    assert TASK_SPECS["boolq"].label_values == (False, True)
    assert not task_info("fashion_mnist").takes_model


def _doc(**over):
    doc = {"name": "t", "fields": {"a": "a"}, "labels": {"values": ["x", "y"]},
           "templates": {"p": {"prompt": "{a} is", "verbalizer": [" x", " y"]}}}
    doc.update(over)
    return doc


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, r"unknown key\(s\) \['colour'\]"),
    ({"labels": {"values": ["x"]}}, "at least two classes"),
    ({"labels": {"values": ["x", 1]}}, "must all be strings, all integers or all booleans"),
    ({"labels": {"values": ["x", "x"]}}, "duplicates"),
    ({"templates": {"p": {"prompt": "{a}", "verbalizer": [" x"]}}}, "1 verbaliser words for 2 labels"),
    ({"templates": {"p": {"prompt": "{a|shout}", "verbalizer": [" x", " y"]}}}, r"unknown filter\(s\) \['shout'\]"),
    ({"templates": {"p": {"prompt": "{b}", "verbalizer": [" x", " y"]}}}, r"uses fields \['b'\]"),
    ({"scoring": "multiple_choice"}, "needs choices"),
    ({"scoring": "regression"}, "scoring must be one of"),
    ({"default_template": "q"}, "default_template 'q'"),
    ({"data": {"hub_splits": ["train"]}}, "two splits"),
])
def test_spec_errors_name_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        spec_from_dict(_doc(**change), origin="my.toml")


def test_user_spec_file_registers_and_loads(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.csv").write_text("text,verdict\nfine,ok\nbad,ko\n")
    (tmp_path / "d" / "dev.csv").write_text("text,verdict\nnice,ok\n")
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[data]\ndir = "d"\ntrain = ["train.csv"]\neval = ["dev.csv"]\n'
                    '[fields]\ntext = "text"\nmood = { from = "verdict", map = { ok = "happy", ko = "sad" } }\n'
                    '[labels]\nfield = "verdict"\nvalues = ["ko", "ok"]\n'
                    '[templates.t]\nprompt = "{text|capitalize} ({mood}):"\nverbalizer = [" no", " yes"]\n')
    task = get_task(str(path))  # a spec file works as a task name, data from its own folder
    assert task.prompt(task.train_examples[0]) == "Fine (happy):" and task.train_labels.tolist() == [1, 0]
    assert load_spec(path).data_dir == str(tmp_path / "d")
    register_task_spec(path)
    assert "mine" in available_tasks() and get_task("MINE").name == "mine"
    with pytest.raises(ValueError, match="already registered"):
        register_task_spec(path)
    register_task_spec(path, overwrite=True)
    from hiso.tasks.text.registry import TASK_SPECS as specs

    del specs["mine"], TEMPLATES["mine"]


# ------------------------------------------------------------------------------------------ multiple choice
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_lm import make_tiny_lm

    from hiso.models import load_causal_lm

    return load_causal_lm(make_tiny_lm(tmp_path_factory.mktemp("m") / "tiny"))


def test_choice_scores_are_mean_log_probabilities_of_the_choice_tokens(tiny):
    model, tok = tiny
    task = get_task("copa", FIXTURES, tokenizer=tok)
    batch = task.make_batches(task.eval_examples, 4)[0]
    assert isinstance(batch, ChoiceBatch) and batch.input_ids.shape[0] == 8
    with torch.no_grad():
        got = batch.class_logits(model)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    logp = torch.log_softmax(logits, -1)
    for row in range(8):  # reference: MeZO's forward(): log-probs of the last option_len tokens, averaged
        ids = batch.input_ids[row][batch.attention_mask[row].bool()]
        n = int(batch.choice_mask[row].sum())
        per_token = logp[row, torch.arange(len(ids) - 1), ids[1:]][-n:]
        n_expected = len(tok(task.prompt(task.eval_examples[row // 2]) + task.choices(task.eval_examples[row // 2])
                             [row % 2])["input_ids"]) - len(tok(task.prompt(task.eval_examples[row // 2]))["input_ids"])
        assert n == n_expected
        assert abs(float(got[row // 2, row % 2]) - float(per_token.mean())) < 1e-5
    with torch.no_grad():
        loss = task.loss(model, batch)
    assert abs(float(loss) - float(torch.nn.functional.cross_entropy(got, batch.labels))) < 1e-6
    assert 0 <= task.accuracy(model, [batch]) <= 1


def test_single_token_choices_equal_verbaliser_classification(tiny):
    """With one-token continuations the two scoring modes give the same loss (log-softmax differs by a constant)."""
    model, tok = tiny
    spec = TASK_SPECS["sst2"]
    task = get_task("sst2", FIXTURES, tokenizer=tok)
    verbal = task.make_batches(task.eval_examples, 4)[0]
    assert isinstance(verbal, TextBatch)
    prompts = [task.prompt(e) for e in task.eval_examples]
    choice = encode_choices(tok, prompts, [spec.templates["mezo"].verbalizer] * 4, task.eval_examples.labels)
    with torch.no_grad():
        a = torch.nn.functional.cross_entropy(verbal.class_logits(model), verbal.labels)
        b = torch.nn.functional.cross_entropy(choice.class_logits(model), choice.labels)
    assert abs(float(a) - float(b)) < 1e-5


def test_choice_truncation_keeps_the_choice_and_rejects_what_cannot_fit(tiny):
    _, tok = tiny
    prompts = ["The man turned on the faucet so"]
    batch = encode_choices(tok, prompts, [[" water flowed .", " it broke ."]], [0], max_length=5)
    assert batch.input_ids.shape == (2, 5) and batch.choice_mask.sum(1).tolist() == [3, 3]
    assert batch.input_ids[0, -3:].tolist() == tok(" water flowed .", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="does not fit max_length 3"):
        encode_choices(tok, prompts, [[" water flowed .", " it"]], [0], max_length=3)
    with pytest.raises(ValueError, match="adds no token"):
        encode_choices(tok, prompts, [["", " it"]], [0])
    with torch.no_grad():
        scores = choice_scores(tiny[0], batch.input_ids, batch.attention_mask, batch.choice_mask)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
