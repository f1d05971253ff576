"""Run the API under uvicorn: bind first, load the model in the background, stop cleanly.

Ctrl-C or SIGTERM stops accepting connections, cancels the running and waiting
generations (each stops between tokens) and lets the open responses finish.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn

from moechat.app.serve.routes import create_app
from moechat.app.serve.worker import ModelWorker
from moechat.runtime.errors import MoechatError
from moechat.runtime.model import LoadedModel, load_model
from moechat.runtime.package import load_package
from moechat.runtime.providers import resolve_device

log = logging.getLogger("moechat.serve")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_queue: int = 8  # requests waiting for the model; more is a 429
    device: str = "auto"
    threads: int | None = None
    max_context: int | None = None
    log_level: str = "info"


class Server(uvicorn.Server):
    """uvicorn's server; a shutdown signal also stops the generations."""

    def __init__(self, config: uvicorn.Config, worker: ModelWorker) -> None:
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.worker.close()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        log.info("stopped")
        for stream in (sys.stdout, sys.stderr):  # uvicorn re-raises the signal next
            stream.flush()

    def stop(self) -> None:
        """Stop from another thread (tests)."""
        self.worker.close()
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port`` (port 0: any free port)."""
    if not 0 <= port <= 65535:
        raise MoechatError(f"--port must be in [0, 65535], got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise MoechatError(f"cannot resolve --host {host!r}: {err.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise MoechatError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(worker: ModelWorker, api_key: str | None = None, log_level: str = "info") -> Server:
    """The uvicorn server for ``worker``; run it with ``server.run(sockets=[bind(...)])``.

    The protocol, loop and logging modules are named, not auto-detected, so the single
    binary carries exactly these (packaging/moechat.spec lists them).
    """
    config = uvicorn.Config(
        create_app(worker, api_key),
        http="h11",
        loop="asyncio",
        ws="none",
        lifespan="off",
        log_level=log_level,
        timeout_graceful_shutdown=5,
    )
    return Server(config, worker)


def serve(path: Path, options: ServeOptions) -> int:
    """``moechat serve``: blocks until Ctrl-C or SIGTERM."""
    if options.max_queue < 0:
        raise MoechatError(f"--max-queue must be at least 0, got {options.max_queue}")
    name = load_package(path).name  # a bad package or device fails here, before binding
    resolve_device(options.device)

    def load() -> LoadedModel:
        return load_model(path, options.device, options.max_context, options.threads)

    worker = ModelWorker(load, name, options.max_queue)
    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    logging.basicConfig(level=logging.INFO, format="moechat serve: %(message)s", stream=sys.stderr)
    log.info("model %s (%s), loading in the background", name, path)
    log.info("OpenAI-compatible API at http://%s:%d/v1 (health: /health)", shown, port)
    if not is_loopback(options.host):
        log.warning(
            "listening on %s: reachable from other machines%s",
            options.host,
            "" if options.api_key else " by anyone (no --api-key)",
        )
    server = make_server(worker, options.api_key, options.log_level)
    worker.on_load_error = lambda _: setattr(server, "should_exit", True)  # nothing to serve
    worker.start_loading()
    server.run(sockets=[sock])
    if worker.state == "failed":
        raise MoechatError(f"could not load {path}: {worker.error}")
    return 0
