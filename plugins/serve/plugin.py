"""The ``specprof serve`` command (registered plugin module; the app lives in ``app``).

Only click is imported here: FastAPI and uvicorn are imported when the command runs, so
``specprof --help`` stays light, and a missing ``serve`` extra is one line.
"""

from __future__ import annotations

import ipaddress

import click

from specprof.engine import hookimpl
from specprof.engine.cli_common import DB_OPTION, console
from specprof.engine.errors import MissingExtraError, SpecprofError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
TOKEN_ENV = "SPECPROF_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def check_bind(host: str, token: str | None) -> None:
    """A SpecprofError when ``host`` is reachable from other machines and there is no token."""
    if not is_loopback(host) and not token:
        raise SpecprofError(f"serving on {host} makes the results reachable from other machines",
                            f"pass --token TOKEN (or set ${TOKEN_ENV}); clients then send "
                            "'Authorization: Bearer TOKEN'")


@click.command()
@DB_OPTION
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="Address to listen on; anything but loopback needs --token.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--token", envvar=TOKEN_ENV, metavar="TOKEN",
              help=f"Require 'Authorization: Bearer TOKEN' on every request (default: ${TOKEN_ENV}).")
@click.option("--open", "open_browser", is_flag=True, help="Open the start page in a browser.")
def serve(db: str | None, host: str, port: int, token: str | None, open_browser: bool) -> None:
    """Browse, compare and query the stored runs in a browser (read-only)."""
    check_bind(host, token)
    try:
        import fastapi  # noqa: F401  (the app needs it; say so before anything starts)
        import uvicorn
    except ImportError as error:
        raise MissingExtraError("specprof serve", "serve") from error
    from specprof.plugins.serve.app import create_app

    app = create_app(db, token=token)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    console().print(f"serving {app.state.store.display_url} at {url} (read-only; Ctrl+C stops)",
                    markup=False, highlight=False)
    if open_browser:
        import threading
        import webbrowser

        threading.Timer(1.0, webbrowser.open, [url]).start()
    uvicorn.run(app, host=host, port=port, log_level="warning")


@hookimpl
def specprof_register_commands(cli: click.Group) -> None:
    cli.add_command(serve)
