"""Runs the console with uvicorn: in a thread of `headscreen serve`, or on its own."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from headscreen.daemon.config import Settings
from headscreen.daemon.web.app import create_app
from headscreen.daemon.web.health import ServeRuntime
from headscreen.db.types import BundleRef

logger = logging.getLogger(__name__)


@dataclass
class WebServer:
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        for server in self.server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        raise RuntimeError("web server is not listening")

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


def _server(settings: Settings, sessions: sessionmaker[Session], bundles: list[BundleRef],
            runtime: ServeRuntime | None = None) -> uvicorn.Server:
    app = create_app(settings, sessions, bundles, runtime)
    # X-Forwarded-For/-Proto from the trusted proxies only: they give the address that log-ins
    # are throttled by and the scheme that makes cookies Secure.
    config = uvicorn.Config(app, host=settings.web.bind_address, port=settings.web.port, log_config=None,
                            access_log=False, server_header=False, lifespan="off", proxy_headers=True,
                            forwarded_allow_ips=list(settings.web.trusted_proxies))
    return uvicorn.Server(config)


def start_web_server(
    settings: Settings, sessions: sessionmaker[Session], bundles: list[BundleRef], ready_timeout_s: float = 15.0,
    runtime: ServeRuntime | None = None,
) -> WebServer:
    """Start serving in a daemon thread; returns once the socket listens."""
    server = _server(settings, sessions, bundles, runtime)
    thread = threading.Thread(target=server.run, name="headscreen-web", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout_s
    # uvicorn offers no start event; its `started` flag is polled briefly instead.
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"web console did not start on {settings.web.bind_address}:{settings.web.port}")
        time.sleep(0.01)
    web = WebServer(server, thread)
    logger.info("web console listening", extra={"action": "web_started", "address": settings.web.bind_address,
                                                "port": web.port})
    return web


def run_web(settings: Settings, sessions: sessionmaker[Session], bundles: list[BundleRef]) -> int:
    """Serve in the foreground until SIGINT/SIGTERM (uvicorn handles the signals)."""
    server = _server(settings, sessions, bundles)
    logger.info("web console starting", extra={"address": settings.web.bind_address, "port": settings.web.port})
    server.run()
    return 0
