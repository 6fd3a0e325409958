"""``python -m hiso_kernels.selfcheck``: check that every backend usable here agrees with the reference bit for bit,
then time a fused perturbation against the eager MeZO loop on this machine."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from . import Round, available_backends, directions, hiso_round_, perturb_, replay_
from .info import report


def _state(dtype, device, sizes=(3, 4097, 1000, 1)):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=g).to(dtype).to(device) for n in sizes]
    hessian = [(torch.rand(n, generator=g) + 0.5).to(device) for n in sizes]
    return params, hessian


def _program(params, hessian, backend):
    perturb_(params, 2**40 + 3, 1e-3, hessian=hessian, offset=2**32 + 1, backend=backend)
    hiso_round_(params, hessian, [7, 7], [0, 1], [0.1, -0.2], [1.0, 0.5], offset=2**32 + 1,
                stochastic_rounding=True, backend=backend)
    replay_(params, [Round([9], [0], [0.05], [1.0]), Round([10, 11], [0, 2], [0.01, 0.02], [0.5, 0.5])],
            hessian=hessian, offset=2**32 + 1, backend=backend)


def agreement() -> bool:
    ok = True
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ref_p, ref_h = _state(dtype, "cpu")
        _program(ref_p, ref_h, "reference")
        for device in devices:
            for backend in available_backends(device):
                if backend == "reference" and device == "cpu":
                    continue
                p, h = _state(dtype, device)
                _program(p, h, backend)
                same = all(torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8))
                           for a, b in zip(p + h, ref_p + ref_h))
                ok &= same
                print(f"  {backend:<7} {device:<5} {str(dtype)[6:]:<9} {'bit-identical' if same else 'DIFFERS'}")
    return ok


def _median_time(fn, repeat=5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def throughput(numel: int) -> None:
    x = torch.zeros(numel, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)

    def eager():  # MeZO's loop: one normal tensor per parameter, then scale and add
        z = torch.normal(mean=0, std=1, size=x.size(), dtype=x.dtype, generator=gen)
        x.data = x.data + 1e-3 * z

    t_eager = _median_time(eager)
    t_fused = _median_time(lambda: perturb_([x], 1, 1e-3))
    t_copy = _median_time(lambda: x.copy_(x + 0))
    print(f"  perturb {numel / 2**20:.0f} Mi bf16 elements: fused {t_fused * 1e3:.1f} ms, eager MeZO loop "
          f"{t_eager * 1e3:.1f} ms ({t_eager / t_fused:.1f}x), read+write copy {t_copy * 1e3:.1f} ms")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--numel", type=int, default=1 << 24)
    args = parser.parse_args(argv)
    print(report())
    print("\nagreement with the reference (perturb, HiSo round with stochastic rounding, replay):")
    ok = agreement()
    print(f"\nthroughput (this machine, torch threads = {torch.get_num_threads()}):")
    throughput(args.numel)
    _ = directions(0, 4)  # the public generator works
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
