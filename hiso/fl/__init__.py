"""Scalar-only federated fine-tuning: messages, server, clients, catch-up replay and an in-process simulation."""

from .messages import ClientReply, MessageError, RoundAssignment, RoundRecord
from .protocol import Client, FLConfig, Replica, Server, local_steps, record_round

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
]
