"""The FastAPI app of ``specprof serve``: routes, the request guard, and error pages.

Read-only by construction: only GET and HEAD reach a route (405 otherwise), every read goes
through the ``Store``'s public methods (each opens its own session, so runs written after
the start show up at once) or, for ``/sql``, through ``ReadOnlyDatabase``. With a token,
every request needs ``Authorization: Bearer TOKEN`` (401 otherwise). Errors are one line: a
page for the HTML routes, ``{"error": ...}`` for ``/api``; unknown ids are 404, malformed
parameters 400, an unreachable database 503, and nothing shows a traceback.
"""

from __future__ import annotations

import hmac
import io
import logging
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from specprof.engine.errors import SpecprofError, StoreError
from specprof.engine.jsonable import jsonable
from specprof.engine.render import SORT_JS, STYLE, escape, page, table
from specprof.engine.store import Store, resolve_url
from specprof.engine.store.readonly import ReadOnlyDatabase
from specprof.plugins.serve import views

log = logging.getLogger("specprof.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STYLESHEET = "/static/specprof.css"
SCRIPT = "/static/specprof.js"
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
     b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
NAV = ('<nav><a href="/">runs</a><a href="/sql">SQL</a><a href="/api">API</a>'
       '<a href="/openapi.json">OpenAPI</a></nav>')
EXAMPLE_SQL = ("SELECT model, layer, backend, sigma_max FROM layer_summary\n"
               "WHERE status = 'ok' ORDER BY sigma_max DESC LIMIT 20")
_DATABASE_FAILURE = re.compile(r"^cannot [a-z ]+ database ")
"""How the store words a database it could not reach or read (``urls.store_error``)."""


class Guard:
    """ASGI middleware: GET/HEAD only, the bearer token, security headers, HEAD bodies off."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await _plain(405, "405 method not allowed: this server is read-only (GET, HEAD)",
                         [(b"allow", b"GET, HEAD")])(scope, receive, send)
            return
        if self.expected is not None:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await _plain(401, "401 unauthorized: send 'Authorization: Bearer TOKEN'",
                             [(b"www-authenticate", b'Bearer realm="specprof"')])(
                                 scope, receive, send)
                return
        head = method == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  *SECURITY_HEADERS]}
            elif message["type"] == "http.response.body" and head:
                message = {**message, "body": b""}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _plain(status: int, text: str, headers: list[tuple[bytes, bytes]]) -> ASGIApp:
    response = PlainTextResponse(text + "\n", status_code=status)
    response.raw_headers.extend([*headers, *SECURITY_HEADERS])
    return response


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api") or request.url.path == "/openapi.json"


def error_response(request: Request, status: int, message: str) -> Response:
    """One line, as JSON for the API and as a small page otherwise."""
    if _wants_json(request):
        return JSONResponse({"error": message}, status_code=status)
    body = f'<p class="error">{escape(message)}</p><p><a href="/">all runs</a></p>'
    return HTMLResponse(page(f"error {status}", body, nav=NAV, stylesheet=STYLESHEET, script=SCRIPT),
                        status_code=status)


def status_of(error: SpecprofError) -> int:
    """404 for what is not there, 503 when the database cannot be read, else 400."""
    if isinstance(error, views.NotFound):
        return 404
    if isinstance(error, StoreError) and _DATABASE_FAILURE.match(error.message):
        return 503
    if isinstance(error, StoreError) and error.message.startswith("no "):
        return 404
    return 400


def open_store(db: str | None) -> Store:
    """The store at ``db``; a SQLite file must exist already (serving never creates one)."""
    url = resolve_url(db)
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file():
            raise StoreError(f"no database file at {path}",
                             "profile a model first (specprof profile MODEL --db PATH), or "
                             "pass --db with another path")
    return Store.open(db)


def create_app(db: str | None = None, *, token: str | None = None,
               store: Store | None = None) -> FastAPI:
    """The app over the database ``db`` (or an open ``store``, which the app then closes)."""
    store = store if store is not None else open_store(db)
    readonly: dict[str, ReadOnlyDatabase] = {}
    readonly_lock = threading.Lock()

    def sql_database() -> ReadOnlyDatabase:
        with readonly_lock:  # opened on first use: most sessions never write SQL
            if "db" not in readonly:
                readonly["db"] = ReadOnlyDatabase(store.engine.url.render_as_string(
                    hide_password=False))
            return readonly["db"]

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        store.close()
        for database in readonly.values():
            database.close()

    app = FastAPI(title="specprof", description="Read-only access to a specprof results store.",
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json", lifespan=lifespan)
    app.state.store = store

    def html(title: str, body: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(page(title, body, nav=NAV, stylesheet=STYLESHEET, script=SCRIPT),
                            status_code=status)

    @app.exception_handler(SpecprofError)
    async def on_specprof_error(request: Request, error: SpecprofError) -> Response:
        # The database's address is the server's business, not the client's.
        text = error.one_line().replace(store.display_url, "the database")
        return error_response(request, status_of(error), text)

    @app.exception_handler(RequestValidationError)
    async def on_bad_parameters(request: Request, error: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}"
                             for e in error.errors())
        return error_response(request, 400, f"malformed request: {problems}")

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException) -> Response:
        return error_response(request, error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, error: Exception) -> Response:
        log.error("%s %s failed: %s: %s", request.method, request.url.path,
                  type(error).__name__, error)
        return error_response(request, 500, f"internal error ({type(error).__name__}); "
                                             "the server log has the details")

    # pages ------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, summary="Runs, newest first")
    def index(model: str | None = Query(None, max_length=200),
              status: str | None = Query(None, max_length=20)) -> HTMLResponse:
        return html("specprof runs", views.index_body(store, model, status or None))

    @app.get("/runs/{run_id}", response_class=HTMLResponse, summary="One run: layers and plots")
    def run_page(run_id: int, where: str | None = Query(None, max_length=500),
                 sort: str | None = Query(None, max_length=50)) -> HTMLResponse:
        return html(*views.run_body(store, _row_id(run_id), where, sort))

    @app.get("/runs/{run_id}/spectra/{spectrum_id}", response_class=HTMLResponse,
             summary="Plots of one layer's spectrum")
    def spectrum_page(run_id: int, spectrum_id: int) -> HTMLResponse:
        return html(*views.spectrum_body(store, _row_id(run_id), _row_id(spectrum_id)))

    @app.get("/compare", response_class=HTMLResponse, summary="Runs side by side")
    def compare_page(runs: Annotated[list[str], Query(max_length=200)]) -> HTMLResponse:
        return html(*views.compare_body(store, views.parse_runs(runs)))

    @app.get("/models/{name:path}", response_class=HTMLResponse, summary="Every run of one model")
    def model_page(name: str) -> HTMLResponse:
        return html(*views.model_body(store, name))

    @app.get("/sql", response_class=HTMLResponse, summary="Read-only SQL over the views")
    def sql_page(q: str | None = Query(None, max_length=10_000),
                 format: str = Query("html", pattern="^(html|csv)$")) -> Response:
        if q and format == "csv":
            result = sql_database().execute(q)
            import csv

            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(result.columns)
            writer.writerows(jsonable(list(row)) for row in result.rows)
            return Response(buffer.getvalue(), media_type="text/csv; charset=utf-8",
                            headers={"content-disposition": 'attachment; filename="query.csv"'})
        body, ok = sql_body(q)
        return html("SQL", body, 200 if ok else 400)

    def sql_body(q: str | None) -> tuple[str, bool]:
        """The SQL page, and whether the statement (if any) ran."""
        form = ('<form method="get" action="/sql"><textarea name="q" rows="6">'
                f"{escape(q or EXAMPLE_SQL)}</textarea><br>"
                '<button type="submit">run</button> '
                '<button type="submit" name="format" value="csv">download CSV</button></form>'
                '<p class="note">One SELECT over the views <code>layer_summary</code> and '
                "<code>run_summary</code> (columns in docs/database.md), read-only, at most "
                f"{sql_database().max_rows:,} rows and {sql_database().timeout_s:g} s.</p>")
        if not q:
            return form, True
        try:
            result = sql_database().execute(q)
        except StoreError as error:
            return form + f'<p class="error">{escape(error.one_line())}</p>', False
        rows = [dict(zip(result.columns, row, strict=True)) for row in result.rows]
        more = (f'<p class="note">only the first {len(rows):,} rows are shown.</p>'
                if result.truncated else "")
        return (form + f"<p>{len(rows)} row(s)</p>{more}"
                + table(rows, result.columns, "sql-table")), True

    @app.get("/api", response_class=HTMLResponse, summary="This API, as a page")
    def api_page() -> HTMLResponse:
        schema = app.openapi()
        rows = [{"path": path, "summary": operation.get("summary", ""),
                 "parameters": ", ".join(p["name"] for p in operation.get("parameters", []))}
                for path, item in schema["paths"].items() for operation in item.values()]
        body = ('<p>Every route answers GET (and HEAD). The schema: '
                '<a href="/openapi.json">/openapi.json</a>.</p>'
                + table(rows, ["path", "summary", "parameters"], "api-table"))
        return html("specprof API", body)

    @app.get(STYLESHEET, include_in_schema=False)
    def stylesheet() -> Response:
        return Response(STYLE, media_type="text/css; charset=utf-8")

    @app.get(SCRIPT, include_in_schema=False)
    def script() -> Response:
        return Response(SORT_JS, media_type="text/javascript; charset=utf-8")

    # JSON ---------------------------------------------------------------------------------

    @app.get("/api/runs", summary="Runs, newest first (as specprof runs --format json)")
    def api_runs(model: str | None = Query(None, max_length=200),
                 status: str | None = Query(None, max_length=20)) -> JSONResponse:
        return JSONResponse(views.runs_records(views.runs_frame(store, model, status)))

    @app.get("/api/runs/{run_id}/layers",
             summary="A run's layer results (as specprof query --run ID --format json)")
    def api_layers(run_id: int, where: str | None = Query(None, max_length=500),
                   sort: str | None = Query(None, max_length=50)) -> JSONResponse:
        views.run_info(store, _row_id(run_id))
        return JSONResponse(views.records(store.query(run=run_id, where=where, sort=sort)))

    @app.get("/api/spectra/{spectrum_id}", summary="One spectrum's singular values")
    def api_spectrum(spectrum_id: int) -> JSONResponse:
        return JSONResponse(views.spectrum_json(store, _row_id(spectrum_id)))

    @app.get("/api/compare", summary="Runs side by side, layer by layer")
    def api_compare(runs: Annotated[list[str], Query(max_length=200)]) -> JSONResponse:
        ids = views.parse_runs(runs)
        rows, models = views.comparison(store, ids)
        return JSONResponse(jsonable({
            "runs": [{"run": r, "model": m} for r, m in zip(ids, models, strict=True)],
            "layers": [{**row, "runs": {str(k): v for k, v in row["runs"].items()}}
                       for row in rows]}))

    app.add_middleware(Guard, token=token)  # type: ignore[arg-type]
    return app


def _row_id(value: int) -> int:
    """A path id: positive, and small enough to be a row id (else the answer is 404)."""
    if value < 1:
        raise SpecprofError(f"ids are positive integers, not {value}", "see the list at /")
    if value >= 2**63:
        raise views.NotFound(f"no row {value}", "see the list at /")
    return value
