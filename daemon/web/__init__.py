"""The admin console: server-rendered pages, the REST API under /api/v1, /healthz
and /metrics, all over the same `db.api` functions the CLI uses."""

from headscreen.daemon.web.app import create_app
from headscreen.daemon.web.context import WebContext
from headscreen.daemon.web.server import WebServer, run_web, start_web_server

__all__ = ["WebContext", "WebServer", "create_app", "run_web", "start_web_server"]
