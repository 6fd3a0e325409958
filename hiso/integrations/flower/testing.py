"""Test and debugging tools for Flower apps: :class:`InProcessGrid` runs a ClientApp for n SuperNodes in this process
(no Ray, no network), so a ServerApp can be driven and checked message by message."""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .transport import envelope_bytes


class InProcessGrid(Grid):
    """A Flower ``Grid`` that runs a ClientApp for ``num_nodes`` SuperNodes in this process, one message at a time.

    For tests and debugging of Flower apps without Ray or a network. As in Flower's runtimes, each node keeps its
    ``Context`` across messages and a ClientApp exception becomes an error reply. ``node_ids`` default to fixed
    pseudo-random 63-bit ids (Flower's are random too); ``node_configs`` default to ``partition-id`` /
    ``num-partitions`` in the order of ``node_ids`` and ``state-dir = ""`` (node state in memory).
    :meth:`restart_node` gives a node a new id, as a restarted SuperNode gets. ``bytes_sent`` /
    ``bytes_received`` add up :func:`envelope_bytes` of every message.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, *, run_config: dict | None = None,
                 node_ids: list[int] | None = None, node_configs: list[dict] | None = None, run_id: int = 1):
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        if num_nodes < 1:
            raise ValueError("num_nodes must be >= 1")
        if node_ids is None:
            import random

            node_ids = random.Random(run_id).sample(range(1, 2**63), num_nodes)
        if node_configs is None:  # state in memory only (state-dir ""): the nodes live in this process
            node_configs = [{"partition-id": i, "num-partitions": num_nodes, "state-dir": ""}
                            for i in range(num_nodes)]
        if len(node_ids) != num_nodes or len(node_configs) != num_nodes or len(set(node_ids)) != num_nodes:
            raise ValueError("need num_nodes distinct node ids and num_nodes node configs")
        # Messages take their run and sender from the process's task identity, which Flower's runtimes set.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 0
        self.client_app = client_app
        self.run_config = dict(run_config or {})
        self.contexts = {int(n): Context(run_id=run_id, node_id=int(n), node_config=dict(c), state=RecordDict(),
                                         run_config=self.run_config) for n, c in zip(node_ids, node_configs)}
        self.bytes_sent = self.bytes_received = 0
        self.dead: set[int] = set()
        self._run = None
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return [n for n in self.contexts if n not in self.dead]

    def push_messages(self, messages) -> list[str]:
        from flwr.app import Error
        from flwr.common.constant import ErrorCode

        ids = []
        for message in messages:
            self.bytes_sent += envelope_bytes(message)
            context = self.contexts.get(int(message.metadata.dst_node_id))
            if context is None or int(message.metadata.dst_node_id) in self.dead:
                reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, "no such node"), reply_to=message)
            else:
                try:
                    reply = self.client_app(message, context)
                except Exception as exc:
                    reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"),
                                    reply_to=message)
            self.bytes_received += envelope_bytes(reply)
            ids.append(message.object_id)
            self._replies[message.object_id] = reply
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def restart_node(self, node_id: int, new_id: int | None = None) -> int:
        """The node restarts: it reconnects under a new id with its node config and a fresh Context (its process
        memory is gone; what it wrote to its state folder is not). Returns the new id."""
        import random

        context = self.contexts.pop(int(node_id))
        new_id = new_id if new_id is not None else random.Random(node_id).randrange(1, 2**63)
        self.contexts[new_id] = Context(run_id=context.run_id, node_id=new_id, node_config=context.node_config,
                                        state=RecordDict(), run_config=self.run_config)
        return new_id

    def kill_node(self, node_id: int) -> None:
        """The node dies: messages to it fail (Flower's NODE_UNAVAILABLE error) until :meth:`restart_node`."""
        self.dead.add(int(node_id))

    def run_server_app(self, server_app: ServerApp) -> None:
        """Run a ServerApp against this grid (the SuperLink's context: node 0, the grid's run config)."""
        from flwr.common.constant import SUPERLINK_NODE_ID

        run_id = next(iter(self.contexts.values())).run_id
        server_app(self, Context(run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                                 run_config=self.run_config))
