"""The Hub probe: an unreachable endpoint is reported quickly, one that answers is found."""

import http.server
import threading
import time

from dictionary_learning import hub_access


def test_unreachable_is_false_quickly():
    start = time.monotonic()
    assert hub_access.reachable("http://127.0.0.1:9", timeout=2.0) is False
    assert time.monotonic() - start < 3


def test_answering_server_is_true():
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert hub_access.reachable(f"http://127.0.0.1:{server.server_port}") is True
    finally:
        server.shutdown()
        server.server_close()
