"""Scalar-only federated fine-tuning (HiSo, DeComFL) on Flower (https://flower.ai), over its Message API.

Flower is the transport and the runtime (simulation on one machine, or SuperLink + SuperNodes across machines); the
protocol is :mod:`hiso.fl` unchanged.

* :mod:`.transport` - the two halves of any hiso Flower App: :func:`make_client_app` (ClientApp) and
  :func:`run_server` (inside a ServerApp): admission to slots, same-round catch-up in chunks, hostile-reply checks
* :mod:`.node` - a SuperNode's durable state between ClientApp processes; :mod:`.admission` - slots and their keys
* :mod:`.apps` - the built-in tasks as a Flower App (``server_app`` / ``client_app``, see ``examples/flower/``)
* :mod:`.testing` - :class:`InProcessGrid`, a Grid that runs a ClientApp for n nodes in this process
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - optional dependency
    raise ImportError("hiso.integrations.flower needs Flower: pip install 'flwr>=1.42,<2' "
                      "(or the hiso[flower] extra)") from exc

from . import apps
from .admission import Admission
from .apps import config_from_run_config, make_task_apps, task_client, task_server_main
from .node import NodeState
from .testing import InProcessGrid
from .transport import (
    _RESIDENT,
    MAX_CATCH_UP,
    RECORD,
    RoundTraffic,
    drop_resident,
    envelope_bytes,
    handle_assignment,
    handle_join,
    make_client_app,
    params_digest,
    run_server,
    run_uid,
    wait_for_nodes,
)


def __getattr__(name: str):
    if name in ("server_app", "client_app"):  # built on first use (apps.__getattr__)
        return getattr(apps, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MAX_CATCH_UP",
    "RECORD",
    "_RESIDENT",
    "Admission",
    "InProcessGrid",
    "NodeState",
    "RoundTraffic",
    "client_app",
    "config_from_run_config",
    "drop_resident",
    "envelope_bytes",
    "handle_assignment",
    "handle_join",
    "make_client_app",
    "make_task_apps",
    "params_digest",
    "run_server",
    "run_uid",
    "server_app",
    "task_client",
    "task_server_main",
    "wait_for_nodes",
]
