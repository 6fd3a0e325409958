"""Cases: what a benchmark row computes (kernel, parameter list shape, dtype, terms) and the byte model."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
RESULTS_DIR = os.path.join(HERE, "results")

MU = 1e-3  # perturbation scale (MeZO's zo_eps)
LR = 1e-6  # learning rate used to form update coefficients
BETA = 0.95  # HiSo's H smoothing
H_MIN = 1e-8

# ------------------------------------------------------------------------------------------------------ shapes
# Parameter lists in the order of transformers' named_parameters(), built from the published configs. The totals are
# checked below against the parameter counts of the models instantiated from those configs (transformers 5.x, meta
# device), so a typo here cannot silently change what is measured.


def llama_shapes(*, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
                 tied: bool) -> list[tuple[int, ...]]:
    """LlamaForCausalLM: embedding, per layer q/k/v/o, gate/up/down and two RMSNorm weights, final norm, lm_head."""
    kv = kv_heads * (hidden // heads)
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
                   (intermediate, hidden), (intermediate, hidden), (hidden, intermediate),
                   (hidden,), (hidden,)]
    shapes.append((hidden,))
    if not tied:
        shapes.append((vocab, hidden))
    return shapes


def opt_shapes(*, hidden: int, ffn: int, layers: int, vocab: int, max_positions: int) -> list[tuple[int, ...]]:
    """OPTForCausalLM (tied lm_head): token and learned position embeddings (+2 offset), final LayerNorm, layers with
    biased k/v/q/out projections, two LayerNorms and a biased fc1/fc2."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden), (max_positions + 2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        for _proj in range(4):
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,), (ffn, hidden), (ffn,), (hidden, ffn), (hidden,), (hidden,), (hidden,)]
    return shapes


MODELS: dict[str, list[tuple[int, ...]]] = {
    # HuggingFaceTB/SmolLM2-135M: hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied
    "smollm2-135m": llama_shapes(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True),
    # facebook/opt-1.3b: hidden 2048, ffn 8192, 24 layers, vocab 50272, 2048 positions
    "opt-1.3b": opt_shapes(hidden=2048, ffn=8192, layers=24, vocab=50272, max_positions=2048),
    # LLaMA-7B: hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000, untied lm_head
    "llama-7b": llama_shapes(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000,
                             tied=False),
}
_EXPECTED = {"smollm2-135m": (272, 134_515_008), "opt-1.3b": (388, 1_315_758_080), "llama-7b": (291, 6_738_415_616)}
for _name, (_count, _total) in _EXPECTED.items():
    assert len(MODELS[_name]) == _count and sum(math.prod(s) for s in MODELS[_name]) == _total, _name


def shape_list(shape: str) -> list[tuple[int, ...]]:
    """Tensor shapes of a named shape: ``flat-2^k`` (one tensor of 2^k elements) or a model in :data:`MODELS`."""
    if shape.startswith("flat-2^"):
        return [(1 << int(shape[len("flat-2^"):]),)]
    return MODELS[shape]


def flat(k: int) -> str:
    return f"flat-2^{k}"


def is_flat(shape: str) -> bool:
    return shape.startswith("flat-")


# ------------------------------------------------------------------------------------------------------ cases
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

#: kernel -> (title, uses H, writes H, label of `terms`)
KERNELS = {
    "perturb": ("perturb", False, False, ""),
    "perturb_h": ("perturb with H", True, False, ""),
    "update": ("multi-direction update", False, False, "directions"),
    "hiso_round": ("HiSo round (1 direction)", True, True, ""),
    "replay": ("replay of HiSo rounds (1 direction each)", True, True, "rounds"),
}


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str
    shape: str
    dtype: str = "bf16"
    terms: int = 1

    @property
    def key(self) -> str:
        return f"{self.kernel}|{self.shape}|{self.dtype}|{self.terms}"

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return shape_list(self.shape)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    @property
    def uses_h(self) -> bool:
        return KERNELS[self.kernel][1]

    @property
    def bytes_per_element(self) -> int:
        """Minimal bytes per element (module docstring): read + write x, + read H, + write H."""
        _, uses_h, writes_h, _ = KERNELS[self.kernel]
        return 2 * self.elem_size + (4 if uses_h else 0) + (4 if writes_h else 0)

    @property
    def min_bytes(self) -> int:
        return self.numel * self.bytes_per_element

    @property
    def param_bytes(self) -> int:
        return self.numel * self.elem_size

    @property
    def largest_tensor_bytes(self) -> int:
        return max(math.prod(s) for s in self.shapes) * self.elem_size

    def label(self) -> str:
        unit = KERNELS[self.kernel][3]
        return f"{self.kernel} {self.shape} {self.dtype}" + (f" x{self.terms} {unit}" if unit else "")


# ------------------------------------------------------------------------------------------------------ plans
def plan(device_type: str, mode: str, dtypes: Sequence[str] = ("bf16",), models: Sequence[str] | None = None
         ) -> list[Case]:
    """The cases of a run, cheapest information first (a GPU run under a time budget keeps what it reached).

    mode "quick": a few minutes on 2 CPU cores; "full": the issue's sweep (CPU: flat 2^16..2^28 for perturb, smaller
    ranges for the heavier kernels so that the whole run stays near 10 minutes; GPU: flat to 2^30 and three models);
    "check": between the two, every kernel, model and provider once (benchmarks/gpu_check.sh).
    ``models`` overrides the parameter lists (default: SmolLM2-135M on the CPU, all three on a GPU).
    """
    gpu = device_type == "cuda"
    if models is None:
        models = ["smollm2-135m"] + (["opt-1.3b", "llama-7b"] if gpu and mode != "quick" else [])
    cases: list[Case] = []
    for dt in dtypes:
        if mode == "quick":
            top = 26 if gpu else 24
            cases += [Case("perturb", m, dt) for m in models[:1]]
            cases += [Case("perturb", flat(k), dt) for k in (16, 20, top)]
            cases += [Case("perturb_h", m, dt) for m in models[:1]] + [Case("perturb_h", flat(20), dt)]
            cases += [Case("update", flat(20), dt, d) for d in (1, 4, 32)]
            cases += [Case("hiso_round", flat(20), dt)]
            cases += [Case("replay", flat(18), dt, r) for r in (1, 10, 100)]
            continue
        if mode == "check":  # gpu_check.sh: every kernel and model once, a few sizes (about 4 minutes on an H100)
            big = models[1:] if models[1:] else models[:1]
            cases += [Case("perturb", m, dt) for m in models]
            cases += [Case("perturb", flat(k), dt) for k in ((16, 20, 24, 28, 30) if gpu else (16, 20, 24, 28))]
            cases += [Case("perturb_h", models[0], dt), Case("perturb_h", flat(28 if gpu else 24), dt)]
            cases += [Case("update", flat(26 if gpu else 22), dt, d) for d in (1, 2, 4, 8, 16, 32)]
            cases += [Case("hiso_round", models[0], dt), Case("hiso_round", flat(28 if gpu else 24), dt)]
            cases += [Case("replay", flat(24 if gpu else 20), dt, r) for r in (1, 10, 100)]
            cases += [Case("hiso_round", big[-1], dt)]
            continue
        top = 30 if gpu else 28
        cases += [Case("perturb", m, dt) for m in models]  # the headline rows first
        cases += [Case("perturb", flat(k), dt) for k in range(16, top + 1, 2)]
        cases += [Case("perturb_h", m, dt) for m in models[:1]]
        cases += [Case("perturb_h", flat(k), dt) for k in range(16, top - 1, 2)]
        upd = flat(26 if gpu else 22)
        cases += [Case("update", upd, dt, d) for d in (1, 2, 4, 8, 16, 32)]
        cases += [Case("update", models[0], dt, d) for d in ((1, 4, 32) if gpu else (1, 4))]
        cases += [Case("hiso_round", m, dt) for m in models[:1]]
        cases += [Case("hiso_round", flat(k), dt) for k in range(16, (28 if gpu else 24) + 1, 4)]
        rep = flat(24 if gpu else 20)
        cases += [Case("replay", rep, dt, r) for r in (1, 10, 100)]
        cases += [Case("replay", models[0], dt, r) for r in ((1, 10, 100) if gpu else (1, 10))]
        for m in models[1:]:  # the rest of the large models last: a run under a time budget drops them first
            cases += [Case("hiso_round", m, dt), Case("update", m, dt, 8)]
    return list(dict.fromkeys(cases))  # no duplicates
