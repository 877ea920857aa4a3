"""``viewer``: serve an analysis run folder as a local page (feature list, histograms, token
heat-maps, logit effects) and a JSON API; with ``--steer``, also a steer box that generates
text with a feature edited (the model and the dictionary are loaded for it)."""

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

    steer = None
    if args.steer:
        steer = steer_backend(args)
    elif args.dictionary or args.model:
        raise CLIError("--dictionary and --model choose what --steer loads: add --steer")
    try:
        server = make_server(args.run_dir, args.host, args.port, run_name=args.run,
                             steer=steer)
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
    if steer is not None:
        s = steer.setting
        print(f"Steer box on: {s.model_name or 'the model'} {s.submodule} ({s.io})")
    print(f"Open {server.url} in a browser; Ctrl+C stops the server.", flush=True)
    serve_until_interrupted(server)
    return 0


def steer_backend(args: argparse.Namespace):
    """The steer box's backend: the run's dictionary on its model (or the flags')."""
    from ..sources import check_device
    from ..viewer import find_run, read_metadata
    from ..viewer.steer import backend_for_run

    device = str(check_device(args.device))
    metadata = read_metadata(find_run(args.run_dir, args.run))
    print("Loading the model and the dictionary for the steer box ...", file=sys.stderr)
    return backend_for_run(metadata, dictionary=args.dictionary, model=args.model,
                           device=device)


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
    g = p.add_argument_group("steering (a steer box on each feature's page)")
    g.add_argument("--steer", action="store_true", help="load the run's dictionary and its "
                   "model, and let the page generate text with a feature added, clamped, "
                   "scaled or ablated")
    g.add_argument("--dictionary", metavar="DIR", help="the dictionary folder to steer "
                   "with (default: the one the run was analysed from)")
    g.add_argument("--model", help="the model to steer (default: the one the run names)")
    g.add_argument("--device", default="cpu", help="device of the model (default: cpu)")
    p.set_defaults(func=viewer)
