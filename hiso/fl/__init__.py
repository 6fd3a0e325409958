"""Scalar-only federated fine-tuning: messages, server, clients, catch-up replay and an in-process simulation.

* :mod:`.messages` - the versioned binary wire format (replies, assignments, log records) with exact byte counts
* :mod:`.protocol` - :class:`FLConfig`, :class:`Server`, :class:`Client`, :class:`Replica`, the local steps
* :mod:`.simulation` - ``hiso train``'s in-process run of the protocol (and :mod:`.baselines`: MeZO, FedAvg)
"""

from .messages import ClientReply, MessageError, RoundAssignment, RoundRecord
from .protocol import Client, FLConfig, Replica, Server, local_steps, record_round, run_local_steps

__all__ = [
    "Client",
    "ClientReply",
    "FLConfig",
    "MessageError",
    "Replica",
    "RoundAssignment",
    "RoundRecord",
    "Server",
    "local_steps",
    "record_round",
    "run_local_steps",
]
