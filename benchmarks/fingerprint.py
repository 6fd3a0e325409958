"""Fingerprints of behaviour: a 20-round main job (Fashion-MNIST CNN, HiSo and DeComFL, configs/fashion_mnist.toml)
and 15 HiSo optimizer steps on a small MLP; prints sha256 prefixes of the final parameters. A refactor must leave them
unchanged: run it from two checkouts (``PYTHONPATH=. python benchmarks/fingerprint.py``) and compare."""

import hashlib

import tomllib
import torch

from hiso.fl import simulation as sim
from hiso.optim import HiSo

with open("configs/fashion_mnist.toml", "rb") as fh:
    doc = tomllib.load(fh)
base = dict(doc["train"])
base.pop("methods")
out = {}
for m in ("hiso", "decomfl"):
    cfg = sim.SimulationConfig(**{**base, **doc["methods"][m], "method": m, "rounds": 20, "eval_every": 10})
    setup = sim.build(cfg)
    rows = sim.run(cfg, setup=setup)
    h = hashlib.sha256()
    for p in setup.model.parameters():
        h.update(p.detach().numpy().tobytes())
    out[m] = (h.hexdigest()[:16], rows[-1]["accuracy"], rows[-1]["bytes_up"])
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
x, y = torch.randn(32, 8), torch.randn(32, 1)
opt = HiSo(net.parameters(), lr=1e-2, num_directions=3)
for _ in range(15):
    opt.step(lambda: torch.nn.functional.mse_loss(net(x), y))
h = hashlib.sha256()
for p in net.parameters():
    h.update(p.detach().numpy().tobytes())
out["optim"] = h.hexdigest()[:16]
print(out)
