"""Byzantine clients against the server's defences: f of n clients answer every round with a manipulated reply.

Attacks on the honest K x P scalars c (the attacker computes them first, as an insider would):
``huge`` (every scalar 3e38, near the float32 maximum), ``nan``, ``sign_flip`` (-c), ``scaled`` (-20 c: a
sign-flipped reply scaled past every honest one, the "inner product manipulation" of Xie et al., arXiv 1903.03936),
``none`` (honest). The task is a small regression (a 2-layer MLP on synthetic data, each client with its own shard).
``python -m hiso.fl.attacks`` prints the matrix of aggregation rule x attack (the README's reliability table).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .messages import ClientReply
from .protocol import DivergedError, FLConfig, Replica, run_local_steps
from .server import Server

ATTACKS = ("none", "huge", "nan", "sign_flip", "scaled")


def _manipulate(attack: str, scalars):
    if attack == "huge":
        return tuple((3e38,) * len(row) for row in scalars)
    if attack == "nan":
        return tuple((math.nan,) * len(row) for row in scalars)
    if attack == "sign_flip":
        return tuple(tuple(-v for v in row) for row in scalars)
    if attack == "scaled":
        return tuple(tuple(-20.0 * v for v in row) for row in scalars)
    return scalars


@dataclasses.dataclass
class AttackResult:
    aggregation: str
    attack: str
    initial_loss: float
    final_loss: float  # on the honest clients' data; inf/nan if the model was destroyed
    skipped: int  # rounds without enough valid replies
    rejected: int
    clipped: int

    @property
    def converged(self) -> bool:
        return math.isfinite(self.final_loss) and self.final_loss < 0.5 * self.initial_loss


def run_attack(aggregation: str, attack: str, *, n: int = 10, f: int = 3, rounds: int = 60, lr: float = 0.02,
               trim: float = 0.3, norm_factor: float = 10.0, scalar_bound: float | None = None,
               seed: int = 0) -> AttackResult:
    """Clients 0..f-1 attack every round; all n are sampled; returns the honest loss before and after."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 1, generator=g)
    shards = []
    for _ in range(n):
        x = torch.randn(32, 8, generator=g)
        shards.append((x, torch.tanh(x @ w) + 0.05 * torch.randn(32, 1, generator=g)))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    config = FLConfig(method="hiso", lr=lr, mu=1e-3, local_steps=1, num_directions=4)
    replica = Replica(model.parameters(), config)
    server = Server(config, n, n, aggregation=aggregation, trim=trim, norm_factor=norm_factor,
                    scalar_bound=scalar_bound, replica=replica, experiment_seed=seed, sampling_seed=seed)

    def honest_loss() -> float:
        with torch.no_grad():
            return sum(float(torch.nn.functional.mse_loss(model(x), y)) for x, y in shards[f:]) / (n - f)

    initial = honest_loss()
    skipped = 0
    for _ in range(rounds):
        for a in server.begin_round():
            x, y = shards[a.client]
            try:
                scalars, _, _ = run_local_steps(replica, a.seeds, lambda x=x, y=y: (
                    lambda: torch.nn.functional.mse_loss(model(x), y)))
            except ValueError as exc:  # a destroyed model: the honest client cannot compute a finite loss
                server.record_failure(a.client, str(exc))
                continue
            if a.client < f:
                scalars = _manipulate(attack, scalars)
            try:
                reply = ClientReply(a.round, a.client, scalars).encode()
            except (OverflowError, ValueError):  # struct refuses the value: send it raw as the float32 maximum
                reply = ClientReply(a.round, a.client, tuple((3.4e38,) * len(r) for r in scalars)).encode()
            server.submit(reply, sender=a.client)
        try:
            if server.end_round() is None:
                skipped += 1
        except DivergedError:
            return AttackResult(aggregation, attack, initial, math.inf, skipped, len(server.rejections),
                                server.clipped)
    return AttackResult(aggregation, attack, initial, honest_loss(), skipped, len(server.rejections), server.clipped)


def matrix(aggregations=("mean", "median", "trimmed_mean"), attacks=ATTACKS, **kw) -> list[AttackResult]:
    return [run_attack(a, t, **kw) for a in aggregations for t in attacks]


def main() -> None:  # pragma: no cover - a report
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--f", type=int, default=3)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--norm-factor", type=float, default=10.0)
    args = parser.parse_args()
    print(f"| aggregation (norm clip {args.norm_factor:g}x) | " + " | ".join(ATTACKS) + " |")
    print("|---" * (len(ATTACKS) + 1) + "|")
    for agg in ("mean", "median", "trimmed_mean"):
        cells = []
        for attack in ATTACKS:
            r = run_attack(agg, attack, n=args.n, f=args.f, rounds=args.rounds, norm_factor=args.norm_factor)
            cells.append(f"{r.final_loss / r.initial_loss:.2f}" + ("" if r.converged else " (fails)"))
        print(f"| {agg} | " + " | ".join(cells) + " |")


if __name__ == "__main__":  # pragma: no cover
    main()
