"""A local, offline viewer for an analysis run folder: ``python -m dictionary_learning viewer
RUN_DIR`` serves a page (feature list by metric, histogram, contexts as token heat-maps,
logit effects) and a JSON API, from the standard library's ``http.server``. Started with
the model (``--steer``, a :class:`~.steer.SteerBackend`), each feature's page also gets a
steer box."""

from .run import Run, find_run, read_metadata
from .server import ViewerServer, make_server, serve, serve_until_interrupted

__all__ = ["Run", "ViewerServer", "find_run", "make_server", "read_metadata", "serve",
           "serve_until_interrupted"]
