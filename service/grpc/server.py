"""The gRPC server: `start` it beside the HTTP server, on the same event loop; `stop` it.

`grpc.aio` in the same process as uvicorn, so both reach the same dataplane, batchers and
metrics. Messages over `max_body_bytes` are refused by gRPC itself (RESOURCE_EXHAUSTED, as REST
answers 413); the TLS files of the HTTP server serve gRPC too. At shutdown `stop` refuses new
calls and lets admitted ones finish for up to `grace` seconds.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from service.config import Settings
from service.dataplane import DataPlane
from service.grpc.inference import GRPCInferenceService
from service.security import Guard

log = logging.getLogger(__name__)


def address(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def options(settings: Settings) -> list[tuple[str, int]]:
    """The server's channel arguments."""
    return [
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", -1),
        # The workers of --workers share the port (the kernel spreads the connections); a lone
        # server holds it alone, so that a second server cannot silently take half its calls.
        ("grpc.so_reuseport", int(settings.worker_state_dir is not None)),
    ]


async def start(
    settings: Settings, dataplane: DataPlane, guard: Guard, state: Any = None
) -> grpc.aio.Server:
    """Serve `inference.GRPCInferenceService` on `settings.host:settings.grpc_port`. `state`:
    the app's state, whose `follower` (with --workers) is read at each call, as REST does."""
    server = grpc.aio.server(options=options(settings))
    service = GRPCInferenceService(
        dataplane, guard, settings.access_log, lambda: getattr(state, "follower", None)
    )
    server.add_generic_rpc_handlers((service.handler(),))
    where = address(settings.host, settings.grpc_port)
    try:
        if settings.ssl_certfile and settings.ssl_keyfile:
            pair = (settings.ssl_keyfile.read_bytes(), settings.ssl_certfile.read_bytes())
            server.add_secure_port(where, grpc.ssl_server_credentials([pair]))
        else:
            server.add_insecure_port(where)
    except RuntimeError as exc:
        raise RuntimeError(
            f"cannot listen for gRPC on {where} ({exc}): choose another --grpc-port, or 0 to "
            "turn gRPC off"
        ) from None
    await server.start()
    scheme = "TLS" if settings.ssl_certfile else "plaintext"
    log.info("gRPC (inference.GRPCInferenceService, %s) on %s", scheme, where)
    return server


async def stop(server: grpc.aio.Server, grace_s: float) -> None:
    """Refuse new calls; admitted ones have `grace_s` seconds to finish, then are cancelled."""
    await server.stop(grace_s)
