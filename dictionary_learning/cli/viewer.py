"""``viewer``: serve an analysis run folder as a local page (feature list, histograms, token
heat-maps, logit effects) and a JSON API."""

from __future__ import annotations

import argparse
import sys

from .common import CLIError


def _port(text) -> int:
    """``--port`` as a port number, checked here, before the run is read or a socket is
    made (an out-of-range port made ``bind`` raise a bare OverflowError)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise CLIError(f"--port must be an integer from 0 to 65535, got {text!r}; pass "
                       "e.g. --port 8000, or --port 0 for any free port")
    return port


def viewer(args: argparse.Namespace) -> int:
    """Serve the run in ``args.run_dir`` until Ctrl+C."""
    args.port = _port(args.port)
    from ..viewer import make_server, serve_until_interrupted

    try:
        server = make_server(args.run_dir, args.host, args.port, run_name=args.run)
    except OSError as e:
        if isinstance(e, (FileNotFoundError, NotADirectoryError, PermissionError)):
            raise
        raise CLIError(f"could not listen on {args.host}:{args.port} ({e.strerror or e}); "
                       "pass another --port, or --port 0 for a free one") from e
    run = server.run
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can read "
              "the run", file=sys.stderr)
    print(f"Serving {run.path} ({run.size:,} features, metrics: {', '.join(run.metrics)})")
    print(f"Open {server.url} in a browser; Ctrl+C stops the server.", flush=True)
    serve_until_interrupted(server)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("viewer", help="browse an analysis run (written by analyze) in a local "
                       "web page")
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a run folder, or a folder of runs (the newest is served)")
    p.add_argument("--run", default=None, metavar="NAME",
                   help="serve the run subfolder NAME of RUN_DIR instead of the newest")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, this machine only)")
    # A string, checked by the command: argparse's own error would add a usage block.
    p.add_argument("--port", default="8000",
                   help="port (default: %(default)s; 0 picks a free port)")
    p.set_defaults(func=viewer)
