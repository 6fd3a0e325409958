"""What keeps one hostile client from ending or poisoning a run: aggregation rules, scalar bounds, a norm clip.

* Aggregation per (k, p) over the accepted replies: ``mean``; coordinate-wise ``median``; ``trimmed_mean`` (Yin et
  al., "Byzantine-robust distributed learning", arXiv 1803.01498), which drops ``max(1, floor(trim m))`` values on
  each side when m >= 3 replies (so the default trims one per side even with 3 replies) and averages the rest. The
  median and a trimmed mean that cuts f per side tolerate f hostile replies among m > 2 f; the mean tolerates none
  (one reply of 3e38 makes H infinite).
* An absolute bound (``scalar_bound``) on every scalar a reply carries, directional scalars and second differences.
* A norm clip derived from recent rounds (norm-bounding, Sun et al., "Can you really backdoor federated learning?",
  arXiv 1911.07963): a reply block whose L2 norm exceeds ``factor`` times the median of the last ``window`` rounds'
  median accepted norm is scaled down to that bound. It clips rather than rejects, so a real change of scale (the
  loss landscape steepening) cannot lock every client out; the reference follows within a window. The reference is
  a function of the journal, so a resumed server clips exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

AGGREGATIONS = ("mean", "median", "trimmed_mean")
DEFAULT_AGGREGATION = "trimmed_mean"
DEFAULT_NORM_FACTOR = 10.0
DEFAULT_NORM_WINDOW = 20

Block = tuple[tuple[float, ...], ...]


def check_settings(aggregation: str, trim: float, scalar_bound: float | None, norm_factor: float,
                   norm_window: int) -> None:
    """ValueError/TypeError for settings outside their range (before any run starts)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if not _is_number(trim) or not 0 <= trim < 0.5:
        raise ValueError(f"trim must be a number in [0, 0.5), got {trim!r}")
    if scalar_bound is not None and (not _is_number(scalar_bound) or not 0 < scalar_bound < math.inf):
        raise ValueError(f"scalar_bound must be None or a finite number > 0, got {scalar_bound!r}")
    if not _is_number(norm_factor) or not 0 <= norm_factor < math.inf:
        raise ValueError(f"norm_factor must be a finite number >= 0 (0: no norm clip), got {norm_factor!r}")
    if not isinstance(norm_window, int) or isinstance(norm_window, bool) or norm_window < 1:
        raise ValueError(f"norm_window must be an integer >= 1, got {norm_window!r}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def trimmed_count(m: int, trim: float) -> int:
    """Values dropped on each side by the trimmed mean of m values: max(1, floor(trim m)) when m >= 3, else 0."""
    if m < 3:
        return 0
    return min(max(1, int(trim * m)), (m - 1) // 2)


def aggregate(blocks: Sequence[Block], rule: str, trim: float) -> Block:
    """Aggregate K x P blocks per (k, p) with ``rule`` (exact sums: :func:`math.fsum`)."""
    k, p = len(blocks[0]), len(blocks[0][0])
    out = []
    for i in range(k):
        row = []
        for j in range(p):
            vals = sorted(b[i][j] for b in blocks)
            if rule == "mean":
                row.append(math.fsum(vals) / len(vals))
            elif rule == "median":
                row.append(statistics.median(vals))
            elif rule == "trimmed_mean":
                cut = trimmed_count(len(vals), trim)
                kept = vals[cut:len(vals) - cut]
                row.append(math.fsum(kept) / len(kept))
            else:
                raise ValueError(f"unknown aggregation {rule!r}")
        out.append(tuple(row))
    return tuple(out)


def block_norm(block: Block) -> float:
    return math.sqrt(math.fsum(v * v for row in block for v in row))


def beyond_bound(block: Block, bound: float | None) -> bool:
    return bound is not None and any(abs(v) > bound for row in block for v in row)


def norm_reference(history: Sequence[float], window: int) -> float | None:
    """The clip reference: the median of the last ``window`` rounds' median norms (None before the first round)."""
    recent = [h for h in history[-window:] if h > 0]
    return statistics.median(recent) if recent else None


def clip(block: Block, bound: float) -> tuple[Block, bool]:
    """The block scaled to L2 norm ``bound`` if it is longer (and whether it was)."""
    norm = block_norm(block)
    if norm <= bound:
        return block, False
    scale = bound / norm
    return tuple(tuple(v * scale for v in row) for row in block), True
