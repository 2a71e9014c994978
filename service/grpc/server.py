"""The gRPC server: `start` it beside the HTTP server, on the same event loop; `stop` it.

Two servers of the same `GRPCInferenceService`, chosen by `--grpc-server`: onnxserve's own
HTTP/2 server (`h2server`, the default: several times cheaper a call than grpcio's) or
`grpc.aio`. Either runs in the same process as uvicorn, so both reach the same dataplane,
batchers and metrics. Messages over `max_body_bytes` are refused (RESOURCE_EXHAUSTED, as REST
answers 413); the TLS files of the HTTP server serve gRPC too. At shutdown `stop` refuses new
calls and lets admitted ones finish for up to `grace` seconds.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from service.config import Settings
from service.dataplane import DataPlane
from service.grpc import h2server
from service.grpc.inference import GRPCInferenceService
from service.security import Guard

log = logging.getLogger(__name__)


def address(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def options(settings: Settings) -> list[tuple[str, int]]:
    """grpcio's channel arguments."""
    return [
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", -1),
        # The workers of --workers share the port (the kernel spreads the connections); a lone
        # server holds it alone, so that a second server cannot silently take half its calls.
        ("grpc.so_reuseport", int(settings.worker_state_dir is not None)),
    ]


async def start(
    settings: Settings, dataplane: DataPlane, guard: Guard, state: Any = None
) -> grpc.aio.Server | h2server.H2Server:
    """Serve `inference.GRPCInferenceService` on `settings.host:settings.grpc_port`. `state`:
    the app's state, whose `follower` (with --workers) is read at each call, as REST does."""
    service = GRPCInferenceService(
        dataplane, guard, settings.access_log, lambda: getattr(state, "follower", None)
    )
    where = address(settings.host, settings.grpc_port)
    try:
        if settings.grpc_server == "native":
            server: grpc.aio.Server | h2server.H2Server = await _native(settings, service)
        else:
            server = await _grpcio(settings, service, where)
    except (RuntimeError, OSError) as exc:
        raise RuntimeError(
            f"cannot listen for gRPC on {where} ({exc}): choose another --grpc-port, or 0 to "
            "turn gRPC off"
        ) from None
    scheme = "TLS" if settings.ssl_certfile else "plaintext"
    log.info("gRPC (inference.GRPCInferenceService, %s, %s server) on %s", scheme,
             settings.grpc_server, where)  # fmt: skip
    return server


async def _native(settings: Settings, service: GRPCInferenceService) -> h2server.H2Server:
    server = h2server.H2Server(settings, service.methods())
    tls = None
    if settings.ssl_certfile and settings.ssl_keyfile:
        tls = h2server.tls_context(str(settings.ssl_certfile), str(settings.ssl_keyfile))
    # --workers share the port (the kernel spreads the connections); a lone server holds it alone
    await server.listen(
        settings.host, settings.grpc_port, tls, settings.worker_state_dir is not None
    )
    return server


async def _grpcio(settings: Settings, service: GRPCInferenceService, where: str) -> grpc.aio.Server:
    server = grpc.aio.server(options=options(settings))
    server.add_generic_rpc_handlers(service.handlers())
    if settings.ssl_certfile and settings.ssl_keyfile:
        pair = (settings.ssl_keyfile.read_bytes(), settings.ssl_certfile.read_bytes())
        server.add_secure_port(where, grpc.ssl_server_credentials([pair]))
    else:
        server.add_insecure_port(where)
    await server.start()
    return server


async def stop(server: grpc.aio.Server | h2server.H2Server, grace_s: float) -> None:
    """Refuse new calls; admitted ones have `grace_s` seconds to finish, then are cancelled."""
    if isinstance(server, h2server.H2Server):
        server.close()
        await server.wait(grace_s)
    else:
        await server.stop(grace_s)
