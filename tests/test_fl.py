"""The scalar-only federated protocol: wire format and byte counts, bit-exact replicas (server, clients that skipped
rounds, a fresh replica replaying the log, a restored checkpoint), rejection of hostile replies, aggregation."""

from __future__ import annotations

import struct

import pytest
import torch

from helpers import assert_bitwise_equal
from hiso.fl import (
    Client,
    ClientReply,
    FLConfig,
    MessageError,
    Replica,
    RoundAssignment,
    RoundRecord,
    Server,
    messages,
    run_local_steps,
)

torch.manual_seed(0)
DATA = [(torch.randn(32, 10), torch.randint(0, 3, (32,))) for _ in range(12)]


def make_model(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batch_source(model, client):
    state = {"i": client}

    def next_batch():
        x, y = DATA[state["i"] % len(DATA)]
        state["i"] += 3

        def closure():
            with torch.no_grad():
                return torch.nn.functional.cross_entropy(model(x), y)
        return closure
    return next_batch


def bits_of(replica):
    return replica.state_bits()


# ---------------------------------------------------------------- wire format
def test_reply_byte_count_k1_p5():
    reply = ClientReply(7, 3, ((0.5, -1.0, 2.0, 0.25, 1e-3),))
    blob = reply.encode()
    assert messages.REPLY_OVERHEAD == 15
    assert len(blob) == 15 + 20
    back = ClientReply.decode(blob)
    assert back.round == 7 and back.client == 3 and back.second_differences is None
    assert back.scalars == tuple(tuple(struct.unpack("<5f", struct.pack("<5f", *reply.scalars[0]))) for _ in [0])


def test_messages_round_trip_with_catch_up_and_second_differences():
    recs = tuple(RoundRecord(r, (2**62 + r, 5), ((1.0, 2.0), (3.0, 4.0)), ((0.5, 0.5), (0.25, 0.125)))
                 for r in range(3))
    a = RoundAssignment(3, 1, (11, 12), recs)
    assert RoundAssignment.decode(a.encode()) == a
    assert len(recs[0].encode()) == 9 + 2 * 8 + 2 * 4 * 4
    r = ClientReply(3, 1, ((1.5, 2.5), (3.5, 4.5)), ((0.5, 1.0), (1.5, 2.0)))
    assert ClientReply.decode(r.encode()) == r


def test_deprecated_names_still_work():
    """Renamed in 0.2 (docs/changelog.md): the old names warn and mean the new ones."""
    r = ClientReply(3, 1, ((1.5,),), ((0.5,),))
    with pytest.warns(DeprecationWarning):
        assert r.curvature == r.second_differences
    with pytest.warns(DeprecationWarning):
        config = FLConfig(curvature="stein")
    assert config.curvature_rule == "stein"
    assert FLConfig.from_json(config.to_json().replace("curvature_rule", "curvature")) == config
    from hiso import fl

    replica = Replica(make_model().parameters(), FLConfig(method="decomfl", num_directions=1))
    with pytest.warns(DeprecationWarning):
        scalars, _, _ = fl.local_steps(replica, [5], batch_source(make_model(), 0))
    assert len(scalars) == 1


@pytest.mark.parametrize("mutate", ["magic", "version", "type", "truncate", "extend"])
def test_undecodable_messages(mutate):
    blob = bytearray(ClientReply(1, 2, ((1.0, 2.0),)).encode())
    if mutate == "magic":
        blob[0:2] = b"XX"
    elif mutate == "version":
        blob[2] = 99
    elif mutate == "type":
        blob[3] = messages.TYPE_ASSIGNMENT
    elif mutate == "truncate":
        blob = blob[:-3]
    else:
        blob += b"\0\0\0\0"
    with pytest.raises(MessageError):
        ClientReply.decode(bytes(blob))


# ---------------------------------------------------------------- replicas stay identical
CONFIGS = {
    "hiso_k2": FLConfig(method="hiso", lr=0.05, local_steps=2, num_directions=3),
    "decomfl": FLConfig(method="decomfl", lr=0.05, local_steps=1, num_directions=5, difference="forward"),
    "hiso_stein": FLConfig(method="hiso", lr=0.05, local_steps=1, num_directions=2, curvature_rule="stein", beta=0.99,
                           h_min=1e-2),
    # the scalar-state rules (hiso.optim.curvature): a global or per-tensor h kept beside x and H
    "hiso_absdelta_k2": FLConfig(method="hiso", lr=1e-3, local_steps=2, num_directions=3, curvature_rule="absdelta"),
    "hiso_absdelta_lagged_k2": FLConfig(method="hiso", lr=1e-3, local_steps=2, num_directions=3,
                                        curvature_rule="absdelta-lagged"),
    "hiso_scalar_forward": FLConfig(method="hiso", lr=0.05, num_directions=3, curvature_rule="scalar",
                                    difference="forward"),
    "hiso_stein_tensor": FLConfig(method="hiso", lr=1e-3, num_directions=2, curvature_rule="stein-tensor"),
    "hiso_gsq_first_round": FLConfig(method="hiso", lr=0.05, num_directions=3, h_init="first-round"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_server_clients_and_log_replay_agree_bit_for_bit(name):
    config = CONFIGS[name]
    server_model = make_model()
    server = Server(config, n_clients=4, clients_per_round=2, replica=Replica(server_model.parameters(), config),
                    sampling_seed=3)
    models = [make_model() for _ in range(4)]
    clients = [Client(i, Replica(m.parameters(), config), batch_source(m, i)) for i, m in enumerate(models)]
    for _ in range(6):
        for a in server.begin_round():
            a = RoundAssignment.decode(a.encode())  # over the wire
            reply = clients[a.client].handle(a)
            # right after catch-up and the local steps the client is back at the server's state of this round
            assert clients[a.client].replica.applied == a.round
            assert server.submit(reply.encode(), sender=a.client)
        server.end_round()
    assert len(server.records) == 6 and not server.rejections
    # a fresh replica replays the log from the initial weights
    fresh = Replica(make_model().parameters(), config)
    fresh.apply(server.records)
    for a, b in zip(bits_of(fresh), bits_of(server.replica)):
        assert_bitwise_equal(a, b, "fresh replica vs server")
    # every client, however many rounds it skipped, catches up to the same bits
    for c in clients:
        c.replica.apply(server.records[c.replica.applied:])
        for a, b in zip(bits_of(c.replica), bits_of(server.replica)):
            assert_bitwise_equal(a, b, f"client {c.id}")
    # the model moved
    assert not torch.equal(next(server_model.parameters()), next(make_model().parameters()))


def test_checkpoint_is_small_and_resumes_exactly():
    config = CONFIGS["hiso_k2"]
    model = make_model()
    server = Server(config, 3, 2, replica=Replica(model.parameters(), config), sampling_seed=1)
    shared = Replica(model.parameters(), config)  # clients in this test share the server's model
    shared.hessian = server.replica.hessian
    for _ in range(5):
        for a in server.begin_round():
            scalars, curv, _ = run_local_steps(server.replica, a.seeds, batch_source(model, a.client))
            server.submit(ClientReply(a.round, a.client, scalars, curv), sender=a.client)
        server.end_round()
    blob = server.checkpoint()
    assert len(blob) < 2048
    restored = Server.restore(blob, replica=Replica(make_model().parameters(), config))
    for a, b in zip(bits_of(restored.replica), bits_of(server.replica)):
        assert_bitwise_equal(a, b)
    assert restored.records == server.records and restored.client_round == server.client_round


# ---------------------------------------------------------------- hostile clients
def _round_with(server, replies_by_client, model):
    assignments = server.begin_round()
    results = {}
    for a in assignments:
        make = replies_by_client.get(a.client)
        if make is None:
            scalars, curv, _ = run_local_steps(server.replica, a.seeds, batch_source(model, a.client))
            reply = ClientReply(a.round, a.client, scalars, curv)
        else:
            reply = make(a)
        results[a.client] = server.submit(reply, sender=a.client)
    return assignments, results, server.end_round()


HOSTILE = {
    "nan": lambda a: ClientReply(a.round, a.client, ((float("nan"),) * 5,)),
    "inf": lambda a: ClientReply(a.round, a.client, ((float("inf"),) + (0.0,) * 4,)),
    "too_few": lambda a: ClientReply(a.round, a.client, ((1.0,) * 4,)),
    "too_many_steps": lambda a: ClientReply(a.round, a.client, ((1.0,) * 5, (1.0,) * 5)),
    "stale": lambda a: ClientReply(a.round - 1, a.client, ((1.0,) * 5,)),
    "impostor": lambda a: ClientReply(a.round, (a.client + 1) % 4, ((1.0,) * 5,)),
    "garbage": lambda a: b"HS\x01\x02garbage",
    "huge": lambda a: ClientReply(a.round, a.client, ((1e30,) * 5,)),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_reply_is_rejected_and_round_completes(kind):
    config = FLConfig(method="hiso", lr=0.05, local_steps=1, num_directions=5)
    model = make_model()
    server = Server(config, 4, 4, replica=Replica(model.parameters(), config), sampling_seed=0, scalar_bound=1e6,
                    experiment_seed=5)
    _round_with(server, {}, model)  # a normal round first, so "stale" has a past round to point at
    before = bits_of(server.replica)
    twin_model = make_model()
    twin = Server.restore(server.checkpoint(), replica=Replica(twin_model.parameters(), config))
    # the hostile client is client 2; its twin run simply never hears from it
    _, results, record = _round_with(server, {2: HOSTILE[kind]}, model)
    assert results[2] is False and server.rejections and server.rejections[-1][0] == 1
    assert all(results[c] for c in (0, 1, 3))
    assert record is not None and len(server.records) == 2
    twin_assign = twin.begin_round()
    for a in twin_assign:
        if a.client == 2:
            continue
        scalars, curv, _ = run_local_steps(twin.replica, a.seeds, batch_source(twin_model, a.client))
        twin.submit(ClientReply(a.round, a.client, scalars, curv), sender=a.client)
    twin_record = twin.end_round()
    assert twin_record == record  # the hostile reply changed nothing in the log
    for a, b in zip(bits_of(server.replica), bits_of(twin.replica)):
        assert_bitwise_equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(before, bits_of(server.replica)))


def test_duplicate_reply_rejected():
    config = FLConfig(method="decomfl", local_steps=1, num_directions=2)
    server = Server(config, 2, 2, sampling_seed=0)
    a = server.begin_round()[0]
    assert server.submit(ClientReply(a.round, a.client, ((1.0, 2.0),)), sender=a.client)
    assert not server.submit(ClientReply(a.round, a.client, ((1.0, 2.0),)), sender=a.client)
    assert "duplicate" in server.rejections[-1][2]


def test_round_without_valid_replies_leaves_everything_unchanged():
    config = FLConfig(method="decomfl", local_steps=1, num_directions=2)
    server = Server(config, 2, 2, sampling_seed=0)
    for a in server.begin_round():
        server.submit(ClientReply(a.round, a.client, ((float("nan"), 1.0),)), sender=a.client)
    assert server.end_round() is None and server.records == []


@pytest.mark.parametrize("aggregation,expected", [("mean", 26.25), ("median", 2.5), ("trimmed_mean", 2.5)])
def test_aggregation_rules(aggregation, expected):
    config = FLConfig(method="decomfl", local_steps=1, num_directions=1)
    server = Server(config, 4, 4, aggregation=aggregation, trim=0.25, sampling_seed=0)
    for a, v in zip(server.begin_round(), [1.0, 2.0, 3.0, 99.0]):
        server.submit(ClientReply(a.round, a.client, ((v,),)), sender=a.client)
    assert server.end_round().scalars[0][0] == pytest.approx(expected)


def test_seeds_are_cryptographic_unless_an_experiment_seed_is_given():
    config = FLConfig(method="decomfl", local_steps=3, num_directions=1)
    s1 = Server(config, 2, 1).begin_round()[0].seeds
    s2 = Server(config, 2, 1).begin_round()[0].seeds
    assert s1 != s2 and all(0 <= s < 2**63 for s in s1)
    e1 = Server(config, 2, 1, experiment_seed=4).begin_round()[0].seeds
    e2 = Server(config, 2, 1, experiment_seed=4).begin_round()[0].seeds
    assert e1 == e2


def test_invalid_configs():
    for kw in (dict(method="fedsgd"), dict(local_steps=0), dict(num_directions=256), dict(lr=float("nan")),
               dict(curvature_rule="stein", difference="forward"), dict(mu=0.0)):
        with pytest.raises(ValueError):
            FLConfig(**kw)
    with pytest.raises(ValueError):
        Server(FLConfig(), 2, 3)
