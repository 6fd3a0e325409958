"""The journal (hiso/fl/journal.py) and the server's exact resume from it: every single-bit flip, cut and trailing
byte raises JournalError naming the first bad entry; a server resumed from its journal (also mid-round) continues
with the uninterrupted server's seeds, clients and bits."""

from __future__ import annotations

import pytest
import torch

from hiso.fl import ClientReply, FLConfig, Journal, JournalError, Replica, Server, run_local_steps
from hiso.fl.journal import CHECK_BYTES

CONFIG = FLConfig(method="hiso", lr=0.05, local_steps=2, num_directions=3)
torch.manual_seed(0)
DATA = [(torch.randn(16, 6), torch.randn(16, 1)) for _ in range(8)]


def make_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def batches(model, client):
    state = {"i": client}

    def next_batch():
        x, y = DATA[state["i"] % len(DATA)]
        state["i"] += 1
        return lambda: torch.nn.functional.mse_loss(model(x), y)
    return next_batch


def play(server: Server, rounds: int, model, *, stop_after_submits: int | None = None) -> None:
    """Run rounds with honest clients sharing the server's model (as the simulator does)."""
    for _ in range(rounds):
        for n, a in enumerate(server.begin_round()):
            if stop_after_submits is not None and n == stop_after_submits:
                return  # the server "crashes" with the round open
            scalars, second, _ = run_local_steps(server.replica, a.seeds, batches(model, a.client))
            server.submit(ClientReply(a.round, a.client, scalars, second).encode(), sender=a.client)
        server.end_round()


def new_server(model, **kw) -> Server:
    return Server(CONFIG, 5, 3, replica=Replica(model.parameters(), CONFIG), experiment_seed=7, sampling_seed=7, **kw)


def small_journal() -> bytes:
    model = make_model()
    server = new_server(model)
    play(server, 4, model)
    return server.checkpoint()


def entry_spans(blob: bytes) -> list[tuple[int, int]]:
    """(start, end) byte span of the header (index 0 here) and of each entry."""
    n = int.from_bytes(blob[4:8], "little")
    spans = [(0, 8 + n + CHECK_BYTES)]
    pos = spans[0][1]
    while pos < len(blob):
        n = int.from_bytes(blob[pos:pos + 4], "little")
        spans.append((pos, pos + 4 + n + CHECK_BYTES))
        pos = spans[-1][1]
    return spans


def test_every_single_bit_flip_raises_naming_the_entry_it_hit():
    blob = small_journal()
    spans = entry_spans(blob)
    assert len(spans) == 5
    for byte in range(len(blob)):
        hit = next(i for i, (a, b) in enumerate(spans) if a <= byte < b) - 1  # -1: the header
        for bit in range(8):
            bad = bytearray(blob)
            bad[byte] ^= 1 << bit
            with pytest.raises(JournalError) as err:
                Journal.from_bytes(bytes(bad))
            assert err.value.entry == hit, (byte, bit, str(err.value))
    assert len(Journal.from_bytes(blob).entries) == 4


def test_every_cut_raises_unless_it_falls_between_entries():
    blob = small_journal()
    spans = entry_spans(blob)
    boundaries = {b: i for i, (_, b) in enumerate(spans)}
    for cut in range(len(blob)):
        if cut in boundaries:  # a shorter, intact journal: the first i entries (a crash there loses nothing acked)
            assert len(Journal.from_bytes(blob[:cut]).entries) == boundaries[cut]
            continue
        with pytest.raises(JournalError) as err:
            Journal.from_bytes(blob[:cut])
        hit = next(i for i, (a, b) in enumerate(spans) if a <= cut < b) - 1
        assert err.value.entry == hit, (cut, str(err.value))


@pytest.mark.parametrize("tail", [b"\0", b"garbage", b"\xff" * 40])
def test_trailing_bytes_raise(tail):
    blob = small_journal()
    with pytest.raises(JournalError, match="entry 4"):
        Journal.from_bytes(blob + tail)


def test_swapped_or_dropped_entries_raise():
    blob = small_journal()
    s = entry_spans(blob)
    swapped = blob[:s[1][0]] + blob[s[2][0]:s[2][1]] + blob[s[1][0]:s[1][1]] + blob[s[3][0]:]
    with pytest.raises(JournalError, match="entry 0"):
        Journal.from_bytes(swapped)
    dropped = blob[:s[2][0]] + blob[s[3][0]:]
    with pytest.raises(JournalError, match="entry 1"):
        Journal.from_bytes(dropped)


def test_corrupt_file_is_an_error_on_resume(tmp_path):
    path = tmp_path / "j.hsj"
    path.write_bytes(small_journal())
    Server.resume(str(path), Replica(make_model().parameters(), CONFIG))
    bad = bytearray(path.read_bytes())
    bad[-20] ^= 4
    path.write_bytes(bytes(bad))
    with pytest.raises(JournalError, match="entry 3"):
        Server.resume(str(path), Replica(make_model().parameters(), CONFIG))


@pytest.mark.parametrize("crash", ["between_rounds", "mid_round"])
def test_resumed_server_continues_exactly(tmp_path, crash):
    path = str(tmp_path / "run.hsj")
    whole_model = make_model()
    whole = new_server(whole_model)
    play(whole, 6, whole_model)

    model = make_model()
    first = new_server(model)
    first.create_journal(path, note="test")
    play(first, 3, model)
    if crash == "mid_round":
        play(first, 1, model, stop_after_submits=2)
    first.journal.close()
    del first  # the process dies; only the file remains

    model = make_model()
    resumed = Server.resume(path, Replica(model.parameters(), CONFIG))
    assert resumed.round == 3 and resumed.journal.header["note"] == "test"
    play(resumed, 3, model)
    assert resumed.records == whole.records
    assert resumed.client_round == whole.client_round and resumed.norms == whole.norms
    assert all(torch.equal(a, b) for a, b in zip(resumed.replica.state_bits(), whole.replica.state_bits()))
    assert Journal.open(path).entries == whole.journal.entries  # the file holds the uninterrupted journal


def test_journal_refuses_to_overwrite_and_keeps_secrets_private(tmp_path):
    path = str(tmp_path / "run.hsj")
    server = new_server(make_model())
    server.create_journal(path)
    with pytest.raises(FileExistsError):
        new_server(make_model()).create_journal(path)
    import os
    import stat

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # it holds the run key
    assert Journal.open(path).header["keys"]["run"] == server.run_key.hex()
