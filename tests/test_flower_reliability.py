"""The Flower deployment path under failures: node state that survives Flower's process-per-message model, restarted
SuperNodes re-admitted to their slot by proof, impostors refused, a ServerApp resumed from its journal mid-round,
catch-up beyond the 65,535-record message limit, dead nodes and min_replies. The reference is the protocol driven
directly (tests/test_flower.py's ``direct_reference``)."""

from __future__ import annotations

import pytest
import torch

flwr = pytest.importorskip("flwr")

from test_flower import (  # noqa: E402
    CONFIG,
    N_NODES,
    PER_ROUND,
    ROUNDS,
    bits_equal,
    direct_reference,
    grid_with,
    make_model,
    new_server,
)

from hiso.fl import FLConfig, Journal, Replica, RoundRecord, Server  # noqa: E402
from hiso.integrations import flower as hf  # noqa: E402


def test_node_state_survives_a_new_process_per_message(tmp_path):
    """Deployment starts a ClientApp process per message: with a state folder, dropping every resident model
    before every round costs no resend and gives the uninterrupted protocol's log."""
    grid = grid_with(state_dir=tmp_path)
    server = new_server()
    digest = hf.params_digest(server.replica.params)
    admission = hf.Admission(N_NODES)
    traffic = []
    for _ in range(ROUNDS):
        hf.drop_resident()  # every message meets a fresh process
        traffic += hf.run_server(grid, server, 1, initial_digest=digest, admission=admission)
    reference = direct_reference(ROUNDS, list(range(N_NODES)))
    assert server.records == reference.records and not server.rejections
    assert sum(t.resent for t in traffic) == 0  # no node was behind: each read on from its own state
    per_round = [t.bytes_down for t in traffic]
    grid2 = grid_with()
    server2 = new_server()
    assert [t.bytes_down for t in hf.run_server(grid2, server2, ROUNDS)] == per_round  # as if resident


def test_restarted_supernode_is_readmitted_to_its_slot_by_proof(tmp_path):
    grid = grid_with(state_dir=tmp_path)
    server = new_server()
    admission = hf.Admission(N_NODES)
    hf.run_server(grid, server, 3, admission=admission)
    hf.drop_resident()
    old = next(iter(grid.contexts))
    slot = int(grid.contexts[old].node_config["partition-id"])
    new = grid.restart_node(old)  # a new Flower node id, the same state folder
    traffic = hf.run_server(grid, server, 3, admission=admission)
    assert admission.node_of(slot) == new
    assert not server.rejections and all(t.accepted == PER_ROUND for t in traffic)
    assert sum(t.join_bytes for t in traffic) > 0  # the restarted node had to join again
    reference = direct_reference(6, list(range(N_NODES)))
    assert server.records == reference.records
    assert bits_equal(server.replica.state_bits(), reference.replica.state_bits())


def test_impostor_cannot_take_an_enrolled_slot(tmp_path):
    grid = grid_with(state_dir=tmp_path / "honest")
    server = new_server()
    admission = hf.Admission(N_NODES)
    hf.run_server(grid, server, 2, admission=admission)
    victim = next(iter(grid.contexts))
    slot = int(grid.contexts[victim].node_config["partition-id"])
    grid.kill_node(victim)
    impostor = grid.restart_node(victim)  # claims the same partition, from another machine (no key)
    grid.dead.discard(impostor)
    grid.contexts[impostor].node_config["state-dir"] = str(tmp_path / "impostor")
    hf.drop_resident()
    hf.run_server(grid, server, 2, admission=admission)
    assert admission.slot_of(impostor) is None and admission.node_of(slot) == victim
    assert "enrolled with another key" in admission.refused[impostor][0]


def test_resumed_serverapp_continues_exactly_with_nodes_answering_the_open_round_again(tmp_path):
    """The server dies with a round open (its nodes already answered); a new server resumes from the journal and
    asks that round again; nodes answer it from their saved reply: the log is the uninterrupted one."""
    reference = direct_reference(ROUNDS, list(range(N_NODES)))
    grid = grid_with(state_dir=tmp_path / "nodes")
    path = str(tmp_path / "journal.hsj")
    server = new_server()
    server.create_journal(path)
    admission = hf.Admission(N_NODES)
    hf.run_server(grid, server, 3, admission=admission)

    class Dies(Exception):
        pass

    def crash(*_):
        raise Dies

    server.end_round = crash  # the round's replies arrive, then the process dies before journaling it
    with pytest.raises(Dies):
        hf.run_server(grid, server, 1, admission=admission)
    server.journal.close()
    hf.drop_resident()
    resumed = Server.resume(path, Replica(make_model().parameters(), CONFIG))
    assert resumed.round == 3
    hf.run_server(grid, resumed, ROUNDS - 3, admission=admission)
    assert resumed.records == reference.records and not resumed.rejections
    assert Journal.open(path).entries == resumed.journal.entries


def test_catch_up_beyond_the_message_limit_comes_in_chunks():
    config = FLConfig(method="decomfl", lr=1e-4, mu=1e-3, local_steps=1, num_directions=1)
    n_records = hf.MAX_CATCH_UP + 1000

    def tiny_client(context):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        x = torch.ones(4, 2)
        from hiso.fl import Client

        return Client(int(context.node_config["partition-id"]), Replica(model.parameters(), config),
                      lambda: (lambda: model(x).pow(2).mean()))

    hf.drop_resident()
    grid = hf.InProcessGrid(hf.make_client_app(tiny_client), 1)
    torch.manual_seed(0)
    server = Server(config, 1, 1, replica=Replica(torch.nn.Linear(2, 1).parameters(), config), experiment_seed=0)
    # a long history the node has never seen (as if it joined late)
    server.records = [RoundRecord(r, (r,), ((1e-3,),)) for r in range(n_records)]
    server.replica.apply(server.records)
    traffic = hf.run_server(grid, server, 1, timeout=600)
    assert traffic[0].accepted == 1 and traffic[0].resent == 1 and not server.rejections
    node = next(iter(hf._RESIDENT.values())).client.replica
    assert node.applied == n_records  # it caught up over two messages and ran the round
    node.apply(server.records[n_records:])
    assert bits_equal(node.state_bits(), server.replica.state_bits())


def test_dead_node_costs_at_most_the_timeout_and_min_replies_skips_thin_rounds():
    import time

    grid = grid_with()
    server = Server(CONFIG, N_NODES, N_NODES, replica=Replica(make_model().parameters(), CONFIG),
                    experiment_seed=3, sampling_seed=3, min_replies=N_NODES)
    hf.run_server(grid, server, 1)
    assert server.round == 1
    for node in list(grid.contexts)[:1]:
        grid.kill_node(node)
    start = time.monotonic()
    traffic = hf.run_server(grid, server, 2, timeout=5)
    assert time.monotonic() - start < 2 * 5 + 5
    assert server.round == 1 and server.iteration == 3  # both rounds skipped (3 of 4 replies), and journaled
    skipped = [e.meta["skipped"] for e in server.entries()[1:]]
    assert all("fewer than min_replies=4" in s for s in skipped) and [t.accepted for t in traffic] == [3, 3]
