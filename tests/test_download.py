"""Official-weight downloads (issue 15, item 6), against a real HTTP server on this machine: a verified
sha256, a timeout instead of a hang, partial downloads resumed, one download for several processes."""

from __future__ import annotations

import hashlib
import http.server
import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from distillkit.errors import UsageError
from distillkit.teachers import download

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class Server:
    """Serves PAYLOAD at /w.pth with HTTP Range support; `stall` accepts and then says nothing; `cut` sends
    only the first bytes and hangs up (a dropped connection)."""

    def __init__(self, stall: bool = False, cut: int | None = None):
        self.requests: list[str | None] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append(self.headers.get("Range"))
                if stall:
                    time.sleep(30)
                    return
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                body = PAYLOAD[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:cut] if cut is not None and not start else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/w.pth"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "weights"


def test_a_download_with_a_known_sha256_is_verified(cache):
    server = Server()
    try:
        good = hashlib.sha256(PAYLOAD).hexdigest()
        path = download.fetch_weights(server.url, "teacher t", sha256=good)
        assert path.read_bytes() == PAYLOAD and path == cache / "w.pth"
        path.unlink()
        with pytest.raises(UsageError, match=r"sha256 .* does not match"):
            download.fetch_weights(server.url, "teacher t", sha256="0" * 64)
        assert not (cache / "w.pth").exists()  # a file that fails its check is not kept
    finally:
        server.close()


def test_a_cached_file_that_changed_since_its_download_is_refused(cache):
    server = Server()
    try:
        path = download.fetch_weights(server.url, "teacher t")
        path.write_bytes(PAYLOAD[:1000])  # damaged on disk after the download
        with pytest.raises(UsageError, match=r"changed since it was downloaded"):
            download.fetch_weights(server.url, "teacher t")
    finally:
        server.close()


def test_a_server_that_never_answers_times_out(cache, monkeypatch):
    monkeypatch.setattr(download, "TIMEOUT_S", 1.0)
    server = Server(stall=True)
    try:
        start = time.perf_counter()
        with pytest.raises(UsageError, match=r"timed out"):
            download.fetch_weights(server.url, "teacher t")
        assert time.perf_counter() - start < 10
    finally:
        server.close()


def test_a_dropped_download_is_resumed_where_it_stopped(cache):
    cut = Server(cut=300_000)
    try:
        with pytest.raises(UsageError, match=r"incomplete"):
            download.fetch_weights(cut.url, "teacher t")
        assert (cache / "w.pth.part").stat().st_size == 300_000 and not (cache / "w.pth").exists()
    finally:
        cut.close()
    server = Server()
    try:
        path = download.fetch_weights(server.url, "teacher t", sha256=hashlib.sha256(PAYLOAD).hexdigest())
        assert path.read_bytes() == PAYLOAD and server.requests == ["bytes=300000-"]
    finally:
        server.close()


def _fetch(url: str, cache_dir: str, results) -> None:
    import os

    os.environ["DISTILLKIT_CACHE"] = cache_dir
    results.put(str(download.fetch_weights(url, "teacher t")))


def test_several_processes_download_the_file_once(tmp_path):
    server = Server()
    try:
        results = multiprocessing.get_context("spawn").Queue()
        workers = [
            multiprocessing.get_context("spawn").Process(target=_fetch, args=(server.url, str(tmp_path), results))
            for _ in range(2)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        paths = {results.get(timeout=5) for _ in workers}
        assert paths == {str(tmp_path / "weights" / "w.pth")} and len(server.requests) == 1
        assert Path(paths.pop()).read_bytes() == PAYLOAD
    finally:
        server.close()
