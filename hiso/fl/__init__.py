"""Scalar-only federated fine-tuning: messages, server, clients, catch-up replay, a durable journal, a simulation.

* :mod:`.messages` - the versioned binary wire format (replies, assignments, log records) with exact byte counts
* :mod:`.protocol` - :class:`FLConfig`, :class:`Client`, :class:`Replica`, the local steps
* :mod:`.server` - :class:`Server`: sampling, validation, robust aggregation (:mod:`.robust`), the journaled log
* :mod:`.journal` - the crash-safe, checksummed journal; :mod:`.keys` - the run key and its PRF (seeds, samples)
* :mod:`.simulation` - ``hiso train``'s in-process run of the protocol (and :mod:`.baselines`: MeZO, FedAvg)
"""

from .journal import Journal, JournalError
from .messages import ClientReply, MessageError, RoundAssignment, RoundRecord
from .protocol import Client, DivergedError, FLConfig, Replica, local_steps, record_round, run_local_steps
from .server import AGGREGATIONS, RoundEntry, Server

__all__ = [
    "AGGREGATIONS",
    "Client",
    "ClientReply",
    "DivergedError",
    "FLConfig",
    "Journal",
    "JournalError",
    "MessageError",
    "Replica",
    "RoundAssignment",
    "RoundEntry",
    "RoundRecord",
    "Server",
    "local_steps",
    "record_round",
    "run_local_steps",
]
