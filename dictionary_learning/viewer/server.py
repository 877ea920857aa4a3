"""The viewer's local HTTP server: a static page and a small JSON API over one run folder.

Standard library only (``http.server``). Endpoints:

- ``GET /`` — the page (``static/index.html``; its scripts and styles are served from
  ``/static/``, nothing is fetched from another host).
- ``GET /api/metadata`` — the run's ``metadata.json`` plus ``metrics`` (the ranking names).
- ``GET /api/features?metric=NAME[&offset=O&limit=L]`` — features ranked by ``NAME``,
  largest first: ``{metric, total, offset, features: [{id, value, <every metric>}]}``.
- ``GET /api/feature_info?id=N`` — one feature's statistics, histogram, top and random
  contexts (tokens as strings) and logit effects.
- ``GET /api/steer`` — whether the steer box is on: ``{"available": false}``, or what it
  steers (only a server started with the model, ``steer=``, has it).
- ``POST /api/steer`` — a JSON request run by :class:`~.steer.SteerBackend` (generation
  with and without an intervention on features). Only from this server's own page: the
  body must be ``application/json`` (so another site's page cannot send it without a
  CORS preflight, which is never granted), at most ``MAX_BODY`` bytes, and the ``Host``
  and any ``Origin`` must name this server (no DNS rebinding).

Bad input answers JSON ``{"error": ...}``: 400 for a malformed id/offset/limit, an
unknown metric or a bad steer request, 403 for a steer request from elsewhere, 404 for an
id outside ``0..dict_size-1``, an unknown path, or steering on a server without the model,
415 for a steer body that is not JSON.

Connections: each handler thread holds one connection, so a client that connects and sends
nothing (or half a request) would hold a thread forever. Two limits keep that bounded: every
accepted connection gets a socket timeout (``timeout``, default 10 s; a read or write that
waits longer drops the connection, idle keep-alive ones included), and at most
``max_connections`` (default 32) are served at once; one more is answered ``503`` at once
(``Retry-After: 1``) and closed, without waiting, so the accept loop never blocks. A browser
opens about six connections per host, far below the bound.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from .run import Run, find_run

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# Defence in depth: the page builds its DOM from text nodes, and even so may run only its
# own scripts and styles, and fetch only from this server.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
INTEGER = re.compile(r"[+-]?[0-9]{1,18}")
DEFAULT_TIMEOUT = 10.0  # seconds a connection may wait on the client for one read or write
DEFAULT_MAX_CONNECTIONS = 32  # connections (handler threads) served at once
MAX_BODY = 64 * 1024  # bytes of a POST body
LOOPBACK = ("127.0.0.1", "localhost", "::1")
STEER_OFF = {"available": False, "reason": "start the viewer with --steer (it loads the "
             "model and the dictionary) to steer features here"}


def check_port(port) -> int:
    """``port`` if it is a TCP port number, ``0..65535`` (0: any free port); a ValueError
    saying so otherwise (``bind`` would raise an OverflowError with no hint)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer from 0 to 65535 (0 picks a free port), "
                         f"got {port!r}")
    return port


class BadRequest(Exception):
    """A request the client got wrong; answered with ``status`` and a JSON message."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def _static_files() -> dict[str, Path]:
    """URL path -> file, for the page's own files (a fixed list: no path is ever joined)."""
    files = {f"/static/{p.name}": p for p in STATIC_DIR.iterdir()
             if p.is_file() and p.suffix in CONTENT_TYPES}
    files["/"] = files["/index.html"] = STATIC_DIR / "index.html"
    return files


def _integer(query: dict, name: str, default: int | None = None) -> int | None:
    values = query.get(name)
    if not values:
        if default is None:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"missing parameter {name!r} (an integer)")
        return default
    if not INTEGER.fullmatch(values[0]):
        raise BadRequest(HTTPStatus.BAD_REQUEST,
                         f"parameter {name!r} must be an integer, got {values[0][:40]!r}")
    return int(values[0])


class ViewerHandler(BaseHTTPRequestHandler):
    """Answers GET requests from the server's ``run`` and its static files."""

    server_version = "dictionary_learning-viewer"
    protocol_version = "HTTP/1.1"
    timeout = DEFAULT_TIMEOUT  # the socket timeout; the server's ``connection_timeout`` wins

    def setup(self) -> None:
        """Take the server's connection timeout, so that each server may set its own (the
        base class applies ``self.timeout`` to the socket)."""
        self.timeout = getattr(self.server, "connection_timeout", self.timeout)
        super().setup()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        logger.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # a restarted server may serve another run
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        if getattr(self, "command", None) != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = HTTPStatus.OK) -> None:
        """Send ``obj`` as JSON (or as is, when it is already encoded JSON bytes)."""
        body = obj if isinstance(obj, bytes) else json.dumps(
            obj, separators=(",", ":"), allow_nan=False).encode()
        self._send(status, body, "application/json; charset=utf-8")

    def send_error(self, code, message=None, explain=None) -> None:
        """Errors the base class raises itself (bad request line, unsupported method) as
        JSON too, never an HTML page."""
        self.close_connection = True
        try:
            self._json({"error": message or HTTPStatus(code).phrase}, code)
        except (OSError, ValueError):  # the client went away, or the status line is broken
            logger.debug("could not send error %s", code)

    def do_GET(self) -> None:  # noqa: N802 (the base class's name)
        url = urlsplit(self.path)
        try:
            query = parse_qs(url.query, keep_blank_values=True)
            if url.path.startswith("/api/"):
                self._json(self._api(url.path, query))
            elif url.path in self.server.static_files:
                path = self.server.static_files[url.path]
                self._send(HTTPStatus.OK, path.read_bytes(), CONTENT_TYPES[path.suffix])
            else:
                raise BadRequest(HTTPStatus.NOT_FOUND, f"no such page: {url.path[:80]}")
        except BadRequest as e:
            self._json({"error": str(e)}, e.status)
        except (ConnectionError, TimeoutError):  # the browser went away or stopped reading
            logger.debug("client left while answering %s", self.path)
            self.close_connection = True
        except Exception:  # a bug must answer 500, not kill the connection with a traceback
            logger.exception("error answering %s", self.path)
            self._json({"error": "internal error; see the server's log"},
                       HTTPStatus.INTERNAL_SERVER_ERROR)

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802 (the base class's name)
        url = urlsplit(self.path)
        try:
            if url.path != "/api/steer":
                raise BadRequest(HTTPStatus.NOT_FOUND, f"no such endpoint: {url.path[:80]}")
            body = self._json_body()
            steer = self.server.steer
            if steer is None:
                raise BadRequest(HTTPStatus.NOT_FOUND, STEER_OFF["reason"])
            try:
                answer = steer.run(body)
            except (ValueError, TypeError) as e:
                raise BadRequest(HTTPStatus.BAD_REQUEST, str(e)[:300]) from None
            self._json(answer)
        except BadRequest as e:
            self.close_connection = True
            self._json({"error": str(e)}, e.status)
        except (ConnectionError, TimeoutError):
            logger.debug("client left while answering %s", self.path)
            self.close_connection = True
        except Exception:  # a bug must answer 500, not kill the connection with a traceback
            logger.exception("error answering POST %s", self.path)
            self._json({"error": "internal error; see the server's log"},
                       HTTPStatus.INTERNAL_SERVER_ERROR)

    def _json_body(self):
        """The request's JSON body, refused unless it comes from this server's page."""
        host = self.headers.get("Host", "")
        origin = self.headers.get("Origin")
        allowed = self.server.allowed_hosts
        if (allowed is not None and host not in allowed) or (
                origin is not None and origin != f"http://{host}"):
            raise BadRequest(HTTPStatus.FORBIDDEN, "steer requests are taken only from this "
                             "server's own page")
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise BadRequest(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                             "send the steer request as application/json")
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or not 0 < int(length) <= MAX_BODY:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"a steer request needs a body of 1 to "
                             f"{MAX_BODY} bytes with its Content-Length")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "the request body is not JSON") from None

    def _api(self, path: str, query: dict):
        run: Run = self.server.run
        if path == "/api/metadata":
            return {**run.metadata, "metrics": run.metrics, "run": run.path.name}
        if path == "/api/features":
            metric = (query.get("metric") or [run.metrics[0] if run.metrics else ""])[0]
            if metric not in run.columns:
                raise BadRequest(HTTPStatus.BAD_REQUEST, f"unknown metric {metric[:40]!r}; "
                                 f"this run has: {', '.join(run.metrics)}")
            offset = _integer(query, "offset", 0)
            limit = _integer(query, "limit", -1)
            if offset < 0 or limit < -1:
                raise BadRequest(HTTPStatus.BAD_REQUEST, "offset and limit must be >= 0")
            return self.server.ranked_page(metric, offset, None if limit == -1 else limit)
        if path == "/api/feature_info":
            i = _integer(query, "id")
            if not 0 <= i < run.size:
                raise BadRequest(HTTPStatus.NOT_FOUND, f"no feature {i}: this run has features "
                                 f"0..{run.size - 1}")
            return run.feature_info(i)
        if path == "/api/steer":
            steer = self.server.steer
            return STEER_OFF if steer is None else steer.info()
        raise BadRequest(HTTPStatus.NOT_FOUND, f"no such endpoint: {path[:80]}")


_BUSY_BODY = b'{"error":"too many connections; retry in a second"}'
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\n"
                 b"Content-Type: application/json; charset=utf-8\r\n"
                 b"Content-Length: %d\r\nRetry-After: 1\r\nCache-Control: no-store\r\n"
                 b"Connection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class ViewerServer(ThreadingHTTPServer):
    """A threading HTTP server that serves one :class:`Run`, one thread per connection, at
    most ``max_connections`` at once, each dropped after ``timeout`` seconds without
    progress (see the module's docstring for why)."""

    daemon_threads = True
    # server_close() must not wait for handler threads: a browser keeps idle connections
    # open, and Ctrl+C would hang until they time out. The threads are daemons that only
    # read the run, so leaving them to exit with the process loses nothing.
    block_on_close = False
    # The listen backlog (the base class's is 5): a burst of connections waits in the kernel
    # for the accept loop, which takes or refuses each at once, instead of the client's
    # connect() being retried seconds later.
    request_queue_size = 128

    def __init__(self, run: Run, host: str, port: int, *, timeout: float = DEFAULT_TIMEOUT,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, steer=None):
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) \
                or max_connections < 1:
            raise ValueError(f"max_connections must be an integer >= 1, got "
                             f"{max_connections!r}")
        self.run = run
        self.steer = steer  # a SteerBackend (viewer/steer.py), or None: no steer box
        self.static_files = _static_files()
        self.connection_timeout = float(timeout)
        self.max_connections = max_connections
        self._active = 0  # connections being served; guarded by _active_lock
        self._active_lock = threading.Lock()
        self._refusing = False  # warned that the server is full; reset when a slot frees
        self._pages: dict[tuple, bytes] = {}  # encoded rankings: the page asks for each often
        self._lock = threading.Lock()
        super().__init__((host, check_port(port)), ViewerHandler)
        port = self.server_address[1]
        if host in ("", "0.0.0.0", "::"):  # any address: the Host cannot be checked
            self.allowed_hosts = None
        else:
            names = LOOPBACK if host in LOOPBACK else (host,)
            self.allowed_hosts = {f"{'[' + h + ']' if ':' in h else h}:{port}" for h in names}

    @property
    def active_connections(self) -> int:
        """How many connections have a handler thread now."""
        return self._active

    def process_request(self, request, client_address) -> None:
        """Start a handler thread if fewer than ``max_connections`` run, else refuse the
        connection at once: the accept loop must never wait for a slot."""
        with self._active_lock:
            busy = self._active >= self.max_connections
            if not busy:
                self._active += 1
        if busy:
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # "can't start new thread": give the slot back, drop this one
            logger.warning("could not start a thread for %s", client_address[0], exc_info=True)
            self._release()
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._active_lock:
            self._active -= 1
            self._refusing = False

    def _refuse(self, request, client_address) -> None:
        """Answer 503 without blocking (a non-blocking socket: a fresh connection's send
        buffer takes the few bytes, or the client gets a bare close) and close."""
        # Warn once while full, not once per refusal: a stuck client could flood the log.
        level = logging.DEBUG if self._refusing else logging.WARNING
        self._refusing = True
        logger.log(level, "refusing %s with 503: %d connections already served (each is "
                   "dropped after %g s idle)", client_address[0], self.max_connections,
                   self.connection_timeout)
        try:
            request.setblocking(False)
            try:  # read what already came, so that close() sends FIN, not a reset
                request.recv(65536)
            except BlockingIOError:
                pass
            request.send(BUSY_RESPONSE)
        except OSError:  # the send buffer is full, or the client already left
            logger.debug("could not answer 503 to %s", client_address, exc_info=True)
        self.shutdown_request(request)

    def ranked_page(self, metric: str, offset: int, limit: int | None) -> bytes:
        """``run.features(...)`` as JSON bytes, kept for the next request (up to 64 pages)."""
        key = (metric, offset, limit)
        with self._lock:
            body = self._pages.get(key)
            if body is None:
                body = json.dumps(self.run.features(metric, offset, limit),
                                  separators=(",", ":"), allow_nan=False).encode()
                if len(self._pages) >= 64:
                    self._pages.pop(next(iter(self._pages)))
                self._pages[key] = body
        return body

    def handle_error(self, request, client_address) -> None:
        """Log (instead of printing to stderr) what escaped a handler: a dropped connection."""
        logger.debug("error serving %s", client_address, exc_info=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"


def make_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000,
                run_name: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                max_connections: int = DEFAULT_MAX_CONNECTIONS, steer=None) -> ViewerServer:
    """A server (not yet serving) for the run in ``run_dir`` — a run folder, or a folder of
    runs (the newest, or ``run_name``). ``port=0`` picks a free port; see ``server.url``.
    ``timeout`` (seconds) and ``max_connections`` bound what slow or idle clients can hold
    (see the module's docstring). The port is checked before the run is read, so a bad one
    fails fast. ``steer`` (a :class:`~.steer.SteerBackend`) turns on the steer box. Start it
    with ``server.serve_forever()`` (or :func:`serve`); stop with ``shutdown()``."""
    check_port(port)
    run = Run(find_run(run_dir, run_name))
    server = ViewerServer(run, host, port, timeout=timeout, max_connections=max_connections,
                          steer=steer)
    if run.metrics:  # the page's first request: rank now, not while the user waits
        server.ranked_page(run.metrics[0], 0, None)
    logger.info("serving %s (%d features) at %s", run.path, run.size, server.url)
    return server


def serve_until_interrupted(server: ViewerServer) -> None:
    """Serve requests until Ctrl+C, then close the server's socket."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("stopped")
    finally:
        server.server_close()


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000,
          run_name: str | None = None, in_thread: bool = False, *,
          timeout: float = DEFAULT_TIMEOUT,
          max_connections: int = DEFAULT_MAX_CONNECTIONS, steer=None) -> ViewerServer:
    """Make a server and serve: until Ctrl+C, or, with ``in_thread``, in a daemon thread
    while the caller goes on (then stop it with ``server.shutdown(); server.server_close()``).
    ``timeout``, ``max_connections`` and ``steer`` as for :func:`make_server`. Returns the
    server (its address is ``server.url``)."""
    server = make_server(run_dir, host, port, run_name, timeout=timeout,
                         max_connections=max_connections, steer=steer)
    if in_thread:
        threading.Thread(target=server.serve_forever, name="viewer", daemon=True).start()
    else:
        serve_until_interrupted(server)
    return server
