"""The viewer's server and API against the run folder's own files, read here by hand.

Runs are synthetic (``write_synthetic_run``) in the format ``analyze`` writes; every expected
value below comes from re-reading those JSON files, not from the viewer's code.
"""

import contextlib
import json
import math
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dictionary_learning.cli import main
from dictionary_learning.viewer import find_run, make_server
from dictionary_learning.viewer.synthetic import write_synthetic_run

ROOT = Path(__file__).resolve().parents[1]
HTML_TOKENS = ["<script>window.__pwned=1</script>", "<b>bold</b>"]


@contextlib.contextmanager
def running(run_dir, **kwargs):
    """A viewer on a free port, serving in a thread; shut down on exit."""
    server = make_server(run_dir, "127.0.0.1", 0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url.rstrip("/")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def get(url):
    """``(status, body bytes, content type)`` of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read(), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers["Content-Type"]


def get_json(url):
    status, body, ctype = get(url)
    assert ctype.startswith("application/json"), (url, status, ctype, body[:200])
    # Strict parse: the browser's JSON.parse rejects NaN, so the server must never send it.
    return status, json.loads(body, parse_constant=lambda c: pytest.fail(f"{url} sent {c}"))


def load(run_dir):
    return {name: json.loads((Path(run_dir) / f"{name}.json").read_text())
            for name in ("metadata", "features", "histograms", "contexts", "logits")}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("runs") / "small", n_features=50,
                               extra_tokens=HTML_TOKENS, seed=3)


@pytest.fixture(scope="module")
def small(small_run):
    with running(small_run) as url:
        yield url, load(small_run)


def test_metadata_is_the_file(small):
    url, files = small
    status, meta = get_json(f"{url}/api/metadata")
    assert status == 200
    assert {k: meta[k] for k in files["metadata"]} == files["metadata"]
    assert meta["metrics"] == files["metadata"]["rankings"]


def test_ranking_equals_sorting_each_column_by_hand(small):
    url, files = small
    columns = files["features"]
    for metric, column in columns.items():
        expected = sorted(range(len(column)), key=lambda i: (-column[i], i))
        status, page = get_json(f"{url}/api/features?metric={metric}")
        assert status == 200 and page["total"] == len(column)
        assert [f["id"] for f in page["features"]] == expected
        for row in page["features"]:
            assert row["value"] == column[row["id"]]
            assert all(row[name] == columns[name][row["id"]] for name in columns)
        status, part = get_json(f"{url}/api/features?metric={metric}&offset=5&limit=7")
        assert [f["id"] for f in part["features"]] == expected[5:12]
    status, default = get_json(f"{url}/api/features")  # first ranking of the metadata
    assert default["metric"] == files["metadata"]["rankings"][0]


def test_feature_info_equals_the_files(small):
    url, files = small
    vocab = files["contexts"]["vocab"]
    never_fired = [i for i in range(50) if str(i) not in files["contexts"]["top"]]
    assert never_fired and "ablation" in files["logits"]["1"]
    for i in [0, 1, 2, 49, *never_fired[:2]]:
        status, info = get_json(f"{url}/api/feature_info?id={i}")
        assert status == 200 and info["id"] == i
        for name, column in files["features"].items():
            assert info[name] == column[i]
        hist = files["histograms"]
        assert info["histogram"] == {"upper": hist["upper"][i], "counts": hist["counts"][i]}
        for key, table in (("top_contexts", "top"), ("random_contexts", "random")):
            expected = [{"tokens": [vocab[t] for t in c["tokens"]], "acts": c["acts"],
                         "max": c["max"], "pos": c["pos"]}
                        for c in files["contexts"][table].get(str(i), [])]
            assert info[key] == expected
        effects = files["logits"].get(str(i), {"promoted": [], "suppressed": []})
        assert info["logit_effects"] == effects
    status, info = get_json(f"{url}/api/feature_info?id=0")
    assert info["top_contexts"][0]["tokens"][:2] == HTML_TOKENS  # served as plain strings


@pytest.mark.parametrize("query, status", [
    ("/api/feature_info?id=abc", 400), ("/api/feature_info?id=", 400),
    ("/api/feature_info", 400), ("/api/feature_info?id=1.5", 400),
    ("/api/feature_info?id=%3Cscript%3E", 400), ("/api/features?metric=nope", 400),
    ("/api/features?metric=density&offset=-1", 400), ("/api/features?limit=x", 400),
    ("/api/feature_info?id=-1", 404), ("/api/feature_info?id=50", 404),
    ("/api/feature_info?id=99999999999999999", 404), ("/nope", 404), ("/api/nope", 404),
    ("/static/../run.py", 404), ("/static/run.py", 404),
])
def test_bad_requests_answer_json_errors(small, query, status):
    url, _ = small
    got, body = get_json(url + query)
    assert got == status and set(body) == {"error"}
    assert "Traceback" not in body["error"]
    assert get_json(f"{url}/api/feature_info?id=0")[0] == 200  # and the server goes on


def test_page_is_served_and_self_contained(small):
    url, _ = small
    status, html, ctype = get(f"{url}/")
    assert status == 200 and ctype.startswith("text/html")
    html = html.decode()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    local = [r for r in refs if r.startswith("/") and not r.startswith("//")]
    assert set(refs) - set(local) <= {"data:,"}  # the empty favicon, inline
    assert "/static/app.js" in local and "/static/style.css" in local
    texts = {"/": html}
    for path in local:
        status, body, _ = get(url + path)
        assert status == 200, path
        texts[path] = body.decode()
    allowed = {"http://www.w3.org/2000/svg"}  # the SVG namespace name, never fetched
    for path, text in texts.items():
        external = set(re.findall(r"(?:https?:)?//[a-zA-Z0-9.-]+\.[a-z]{2,}[^\s\"'`)]*", text))
        assert external <= allowed, f"{path} refers to another host: {external - allowed}"
        sinks = re.findall(r"\.(?:inner|outer)HTML\b|insertAdjacentHTML|document\.write|"
                           r"\beval\(|new Function", text)
        assert not sinks, f"{path} builds HTML from strings: {sinks}"


def test_not_finite_values_become_null_and_rank_last(tmp_path):
    run = write_synthetic_run(tmp_path / "run", n_features=10)
    features = json.loads((run / "features.json").read_text())
    features["density"][4] = math.nan
    (run / "features.json").write_text(json.dumps(features))  # Python writes NaN
    with running(run) as url:
        _, page = get_json(f"{url}/api/features?metric=density")
        assert page["features"][-1]["id"] == 4 and page["features"][-1]["value"] is None
        assert get_json(f"{url}/api/feature_info?id=4")[1]["density"] is None


def test_newest_run_is_served_unless_one_is_named(tmp_path):
    write_synthetic_run(tmp_path / "b_old", n_features=5, created="2024-01-01T00:00:00Z")
    write_synthetic_run(tmp_path / "a_new", n_features=7, created="2025-06-01T12:00:00+00:00")
    (tmp_path / "notes").mkdir()
    assert find_run(tmp_path) == tmp_path / "a_new"
    assert find_run(tmp_path, "b_old") == tmp_path / "b_old"
    assert find_run(tmp_path / "b_old") == tmp_path / "b_old"
    with running(tmp_path, run_name="b_old") as url:
        assert get_json(f"{url}/api/metadata")[1]["dict_size"] == 5
    with pytest.raises(FileNotFoundError, match="no run named 'c'.*a_new, b_old"):
        find_run(tmp_path, "c")


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.json").write_text("{not json")
    short = write_synthetic_run(tmp_path / "short", n_features=6)
    features = json.loads((short / "features.json").read_text())
    features["density"].pop()
    (short / "features.json").write_text(json.dumps(features))
    cases = {tmp_path / "missing": "no run folder", tmp_path / "empty": "holds no analysis run",
             bad: "not valid JSON", short: "has 5 values, but metadata says dict_size = 6"}
    for path, message in cases.items():
        assert main(["viewer", str(path), "--port", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_script_serves_on_a_free_port_and_prints_the_url(small_run):
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "viewer.py"),
                             str(small_run.parent), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert str(small_run) in lines[0] and "50 features" in lines[0], lines
        url = re.search(r"http://127\.0\.0\.1:\d+/", lines[1]).group(0)
        assert get_json(f"{url}api/feature_info?id=3")[0] == 200
        assert get(url)[0] == 200
    finally:
        proc.terminate()
        proc.wait(10)
    assert "Traceback" not in proc.stderr.read()


def test_ten_thousand_features_load_fast(tmp_path):
    """Scale check; timings are recorded in test-artifacts/viewer_api_timings.json. The
    bound is loose on purpose (a shared CPU): it catches a quadratic, not a slow machine."""
    run = write_synthetic_run(tmp_path / "big", n_features=10_000, n_top=1, n_random=1,
                              ctx_len=4, n_bins=10, seed=1)
    column = json.loads((run / "features.json").read_text())["max_activation"]
    start = time.perf_counter()
    with running(run) as url:
        timings = {"open_run_s": time.perf_counter() - start}
        for name, path in [("page_s", "/"), ("app_js_s", "/static/app.js"),
                           ("metadata_s", "/api/metadata"),
                           ("features_default_s", "/api/features"),  # ranked at start
                           ("features_first_s", "/api/features?metric=max_activation"),
                           ("features_again_s", "/api/features?metric=max_activation"),
                           ("features_page_s", "/api/features?metric=density&offset=9000"
                                               "&limit=100"),
                           ("feature_info_s", "/api/feature_info?id=9998")]:
            t = time.perf_counter()
            status = get(url + path)[0]
            timings[name] = time.perf_counter() - t
            assert status == 200, path
        ranked = get_json(f"{url}/api/features?metric=max_activation")[1]["features"]
    assert [f["id"] for f in ranked] == sorted(range(10_000), key=lambda i: (-column[i], i))
    timings = {k: round(v, 4) for k, v in timings.items()}
    print("viewer timings, 10k features:", timings)
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    (out / "viewer_api_timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    assert timings["features_first_s"] < 5 and timings["feature_info_s"] < 5


HALF_REQUEST = b"GET /api/metadata HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # no blank line: unfinished


def half_sent(url, n):
    """``n`` raw connections to ``url``'s server, each having sent half a request."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(HALF_REQUEST)
        socks.append(s)
    return socks


def closed_or_refused(sock, within):
    """What the server did with ``sock`` within ``within`` s: ``"closed"`` (EOF or reset),
    ``"503"`` (answered busy, then closed) or ``"open"`` (still waiting)."""
    sock.settimeout(within)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return "open"
    except ConnectionError:
        return "closed"
    return "503" if data.startswith(b"HTTP/1.1 503") else "closed" if not data else data


def get_server_busy(url):
    """Whether a GET to ``url`` is answered 503 now."""
    try:
        return get(f"{url}/api/metadata")[0] == 503
    except (ConnectionError, urllib.error.URLError):
        return False


def test_idle_connections_are_bounded_then_dropped_and_requests_go_on(small_run):
    """More half-sent connections than the bound: the server keeps at most ``max_connections``
    handler threads, refuses the rest at once, drops the held ones after the timeout, and then
    answers a normal request."""
    bound, timeout = 4, 0.5
    with running(small_run, timeout=timeout, max_connections=bound) as url:
        server_threads = threading.active_count()
        socks = half_sent(url, 3 * bound)
        try:
            start = time.monotonic()
            seen = [closed_or_refused(s, 0.2) for s in socks]
            held = [s for s, what in zip(socks, seen) if what == "open"]
            assert len(held) <= bound, "more connections held than the bound"
            assert sum(what in ("503", "closed") for what in seen) >= 2 * bound, seen
            assert threading.active_count() - server_threads <= bound
            # The refused ones were refused at once, not left to the timeout.
            assert time.monotonic() - start < timeout + 3 * bound * 0.2
            for s in held:  # dropped by the server after its timeout, without an answer
                assert closed_or_refused(s, timeout + 2) == "closed"
            deadline = time.monotonic() + 3
            while True:  # the slots free up as the handler threads finish
                status, body, _ = get(f"{url}/api/metadata")
                if status == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert status == 200 and json.loads(body)["dict_size"] == 50
            assert threading.active_count() - server_threads <= bound
        finally:
            for s in socks:
                s.close()


def test_a_busy_server_answers_503_quickly(small_run):
    with running(small_run, timeout=2, max_connections=1) as url:
        socks = half_sent(url, 1)
        try:
            deadline = time.monotonic() + 2
            while not get_server_busy(url) and time.monotonic() < deadline:
                time.sleep(0.02)
            start = time.monotonic()
            status, body, ctype = get(f"{url}/api/metadata")
            assert time.monotonic() - start < 1
            assert status == 503 and ctype.startswith("application/json")
            assert "too many connections" in json.loads(body)["error"]
        finally:
            for s in socks:
                s.close()


def test_half_sent_connection_is_closed_after_the_timeout(small_run):
    with running(small_run, timeout=0.3) as url:
        (sock,) = half_sent(url, 1)
        with sock:
            start = time.monotonic()
            assert closed_or_refused(sock, 3) == "closed"
            assert 0.2 < time.monotonic() - start < 2


@pytest.mark.parametrize("port", ["99999", "-1", "65536", "abc", "80.5"])
def test_bad_port_is_one_error_line_before_the_run_is_read(tmp_path, capsys, port):
    # The folder is missing too: the port's error comes first, before anything is read.
    assert main(["viewer", str(tmp_path / "missing"), "--port", port]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: --port ") and "\n" not in err, err
    assert "0 to 65535" in err and "--port 0" in err and "Traceback" not in err
    assert captured.out == ""


def test_library_checks_port_and_limits(small_run):
    for kwargs in ({"port": 99999}, {"port": -1}, {"port": 0, "timeout": 0},
                   {"port": 0, "max_connections": 0}):
        with pytest.raises(ValueError):
            make_server(small_run, "127.0.0.1", **kwargs)
