"""The Flower integration: the protocol over Flower's Message API, run by an in-process Grid.

The reference is the protocol itself (:mod:`hiso.fl`, driven directly): over Flower the same seeds and data must give
the same log and the same bits, also when a node restarts, fails or starts from other weights.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

flwr = pytest.importorskip("flwr")

from hiso.fl import Client, FLConfig, Replica, Server  # noqa: E402
from hiso.fl.messages import REPLY_OVERHEAD  # noqa: E402
from hiso.integrations import flower as hf  # noqa: E402

N_NODES, PER_ROUND, ROUNDS = 4, 2, 6
CONFIG = FLConfig(method="hiso", lr=2e-2, mu=1e-3, local_steps=2, num_directions=3)


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


def partition_data(pid: int):
    g = torch.Generator().manual_seed(100 + pid)
    x = torch.randn(64, 7, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def make_client(pid: int, init_seed: int = 0) -> Client:
    model = make_model(init_seed)
    x, y = partition_data(pid)
    position = Position()

    def next_closure():  # batches of 16 in a fixed cycle: the same sequence however the client is driven
        i = position.i % 4
        position.i += 1
        xb, yb = x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)]
        return lambda: torch.nn.functional.mse_loss(model(xb), yb)

    return Client(pid, Replica(model.parameters(), CONFIG), next_closure, data_state=position)


class Position:
    """Where a client is in its data (what a node saves between messages)."""

    def __init__(self):
        self.i = 0

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def flower_client(context) -> Client:
    cfg = context.node_config
    if cfg.get("explode", False):
        raise RuntimeError("this node's data loader is broken")
    return make_client(int(cfg["partition-id"]), init_seed=int(cfg.get("init-seed", 0)))


def new_server() -> Server:
    return Server(CONFIG, N_NODES, PER_ROUND, replica=Replica(make_model().parameters(), CONFIG), sampling_seed=3,
                  experiment_seed=11)


def direct_reference(rounds: int, partition_of, *, silent=(), restart_at=None) -> Server:
    """The protocol without Flower: the same server, clients called directly (``silent`` ones never answer; at
    round ``restart_at`` every client is rebuilt from the initial weights and caught up from the whole log)."""
    def clients_at_start():
        out = [make_client(partition_of[c]) for c in range(N_NODES)]
        for c, client in enumerate(out):
            client.id = c  # the server's index of the node that holds this partition
        return out

    server = new_server()
    clients = clients_at_start()
    for rnd in range(rounds):
        if rnd == restart_at:
            clients = clients_at_start()
        for a in server.begin_round():
            if a.client not in silent:
                client = clients[a.client]
                a = dataclasses.replace(a, catch_up=tuple(server.records[client.replica.applied:]))
                server.submit(client.handle(a).encode(), sender=a.client)
        server.end_round()
    return server


def grid_with(node_configs=None, run_id=1, state_dir=""):
    hf.drop_resident()
    app = hf.make_client_app(flower_client)
    if node_configs is None:
        node_configs = [{"partition-id": i, "num-partitions": N_NODES} for i in range(N_NODES)]
    node_configs = [{"state-dir": str(state_dir), **c} for c in node_configs]
    return hf.InProcessGrid(app, N_NODES, node_configs=node_configs, run_id=run_id)


def partition_order(grid) -> list[int]:
    """Client index (slot) -> the partition of the node holding it: a node's slot is its client's id, here its
    partition, whatever Flower's node ids are."""
    return list(range(N_NODES))


def node_of_partition(grid, pid: int) -> int:
    return next(n for n, c in grid.contexts.items() if int(c.node_config["partition-id"]) == pid)


def bits_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_flower_run_equals_the_protocol_bit_for_bit():
    grid = grid_with()
    server = new_server()
    traffic = hf.run_server(grid, server, ROUNDS, initial_digest=hf.params_digest(server.replica.params))
    reference = direct_reference(ROUNDS, partition_order(grid))
    assert server.records == reference.records and not server.rejections
    assert bits_equal(server.replica.state_bits(), reference.replica.state_bits())
    # a fresh replica replaying the log from the initial weights holds the same bits
    fresh = Replica(make_model().parameters(), CONFIG)
    fresh.apply(server.records)
    assert bits_equal(fresh.state_bits(), server.replica.state_bits())
    # every node's resident model, caught up, holds them too
    assert len(hf._RESIDENT) == N_NODES
    for state in hf._RESIDENT.values():
        resident = state.client.replica
        resident.apply(server.records[resident.applied:])
        assert bits_equal(resident.state_bits(), server.replica.state_bits())
    # bytes: each accepted reply is the protocol's framing + 4 K P bytes; Flower's envelope is counted apart
    assert [t.accepted for t in traffic] == [PER_ROUND] * ROUNDS
    per_reply = REPLY_OVERHEAD + 4 * CONFIG.local_steps * CONFIG.num_directions
    assert all(t.bytes_up == PER_ROUND * per_reply for t in traffic)
    assert grid.bytes_received > sum(t.bytes_up for t in traffic)


def test_restarted_node_is_resent_the_log_in_the_same_round():
    grid = grid_with()
    server = new_server()
    hf.run_server(grid, server, 3)
    hf.drop_resident()  # every node process restarts: no resident model anywhere
    traffic = hf.run_server(grid, server, 3)
    assert all(t.accepted == PER_ROUND for t in traffic) and not server.rejections
    assert sum(t.resent for t in traffic) >= 1
    reference = direct_reference(6, partition_order(grid), restart_at=3)
    assert server.records == reference.records
    assert bits_equal(server.replica.state_bits(), reference.replica.state_bits())


def test_node_with_other_initial_weights_is_rejected_and_changes_nothing():
    configs = [{"partition-id": i, "num-partitions": N_NODES} for i in range(N_NODES)]
    configs[2]["init-seed"] = 1  # this node starts from other weights
    grid = grid_with(configs)
    bad = 2  # the slot of partition 2
    server = new_server()
    hf.run_server(grid, server, ROUNDS, initial_digest=hf.params_digest(server.replica.params))
    reasons = [r for rnd, c, r in server.rejections if c == bad]
    assert reasons and all("initial weights differ" in r for r in reasons)
    assert {c for _, c, _ in server.rejections} == {bad}
    # the rejected answers changed nothing: the log is that of a run in which the node never answered
    reference = direct_reference(ROUNDS, partition_order(grid), silent={bad})
    assert server.records == reference.records
    assert bits_equal(server.replica.state_bits(), reference.replica.state_bits())


def test_client_app_exception_is_logged_and_the_round_completes():
    configs = [{"partition-id": i, "num-partitions": N_NODES} for i in range(N_NODES)]
    configs[0]["explode"] = True
    grid = grid_with(configs)
    broken = 0
    server = new_server()
    traffic = hf.run_server(grid, server, ROUNDS)
    assert len(server.records) == ROUNDS  # every round had a valid reply from someone
    failures = [(c, r) for _, c, r in server.rejections]
    assert failures and all(c == broken and "this node's data loader is broken" in r for c, r in failures)
    assert sum(t.failed for t in traffic) == len(failures)


def test_run_server_rejects_an_admission_of_the_wrong_size():
    grid = grid_with()
    server = Server(CONFIG, N_NODES + 1, PER_ROUND)
    with pytest.raises(ValueError, match="expects 5 clients"):
        hf.run_server(grid, server, 1, admission=hf.Admission(N_NODES))
    assert server.round == 0


def test_a_slot_without_a_node_fails_its_rounds_and_the_rest_go_on():
    grid = grid_with()
    server = Server(CONFIG, N_NODES + 1, N_NODES + 1, replica=Replica(make_model().parameters(), CONFIG),
                    experiment_seed=1, sampling_seed=1)
    hf.run_server(grid, server, 2)
    assert server.round == 2
    assert {c for _, c, _ in server.rejections} == {N_NODES}
    assert all("no admitted node holds slot 4" in r for _, _, r in server.rejections)


def test_run_config_maps_to_the_simulation_config():
    cfg = hf.config_from_run_config({"num-server-rounds": 7, "num-directions": 2, "method": "decomfl",
                                     "model": "", "num-train": 0, "out": "x"})
    assert (cfg.rounds, cfg.num_directions, cfg.method, cfg.model, cfg.num_train) == (7, 2, "decomfl", None, None)
    with pytest.raises(ValueError, match="unknown run-config key 'num-direction'"):
        hf.config_from_run_config({"num-direction": 2})
    with pytest.raises(ValueError, match="scalar-only methods"):
        hf.config_from_run_config({"method": "fedavg"})


@pytest.mark.slow
def test_task_app_equals_the_in_process_simulation(tmp_path):
    """The shipped Flower App (Fashion-MNIST) gives exactly what ``hiso train``'s simulator gives."""
    pytest.importorskip("hiso.tasks")
    from hiso.fl import simulation

    try:
        simulation.build(simulation.SimulationConfig(num_train=40, num_eval=20))
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    run_config = {"num-server-rounds": 4, "n-clients": 3, "clients-per-round": 2, "num-directions": 2,
                  "num-train": 120, "num-eval": 60, "batch-size": 16, "eval-every": 2, "lr": 3e-3,
                  "deterministic-seeds": True, "out": str(tmp_path)}
    hf.drop_resident()
    grid = hf.InProcessGrid(hf.client_app, 3, run_config=run_config, node_ids=[5, 9, 40])  # sorted = partitions
    grid.run_server_app(hf.server_app)  # the App's own ServerApp, as Flower's runtime would call it
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sim = simulation.run(dataclasses.replace(hf.config_from_run_config(run_config), n_clients=3))
    assert [m["round"] for m in metrics] == [m["round"] for m in sim] == [0, 2, 4]
    assert [m["accuracy"] for m in metrics] == [m["accuracy"] for m in sim]
    assert [m["eval_loss"] for m in metrics] == [m["eval_loss"] for m in sim]
    assert [m["bytes_up"] for m in metrics] == [m["bytes_up"] for m in sim]


def test_hiso_info_lists_flower():
    from hiso.cli import integrations_report

    assert f"flwr {flwr.__version__}: hiso.integrations.flower" in integrations_report()
