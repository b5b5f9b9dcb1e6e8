"""Remote images against a real HTTP server on 127.0.0.1: every failure is one exact report entry."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from vlmtune.config import ReadArgs
from vlmtune.data.sources.readers import read_samples
from vlmtune.data.media.paths import MediaRules
from vlmtune.data.media.remote import FetchOptions, fetch_remote_images
from vlmtune.data.sources.records import record_to_conversation
from vlmtune.errors import Problem


def _png(w=9, h=5) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


class _Handler(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, length: int | None = None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path
        _Handler.hits[path] = _Handler.hits.get(path, 0) + 1
        if path == "/ok.png" or path == "/same.png":
            self._send(200, PNG, {"Content-Type": "image/png"})
        elif path == "/missing.png":
            self._send(404, b"nope")
        elif path == "/slow.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            time.sleep(1.5)
            self.wfile.write(PNG)
        elif path == "/big.png":
            self._send(200, b"x" * 5000)
        elif path == "/big-unannounced.png":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the cap applies while reading
            self.wfile.write(b"x" * 5000)
            self.close_connection = True
        elif path == "/truncated.png":
            self._send(200, PNG[:20], length=len(PNG))
            self.close_connection = True
        elif path == "/text.png":
            self._send(200, b"<html>not an image</html>", {"Content-Type": "text/html"})
        elif path == "/loop-a":
            self._send(302, headers={"Location": "/loop-b"})
        elif path == "/loop-b":
            self._send(302, headers={"Location": "/loop-a"})
        elif path == "/hop":
            self._send(301, headers={"Location": "/ok.png"})
        elif path == "/banner":
            self.send_response(404, "SECRET-BANNER")
            self.send_header("Content-Length", "14")
            self.end_headers()
            self.wfile.write(b"SECRET-CONTENT")
        elif path == "/ssh":
            self.wfile.write(b"SSH-2.0-OpenSSH_9.6 SECRET\r\n")
            self.close_connection = True
        elif path == "/to-metadata":
            self._send(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
        elif path == "/trickle.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            try:
                for b in PNG:  # a byte every 50 ms: each read is quick, the whole fetch is not
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                _Handler.hits["/trickle.png cut"] = 1
        elif path == "/flaky.png":
            if _Handler.hits[path] == 1:
                self._send(503, b"busy")
            else:
                self._send(200, PNG)
        else:
            self._send(404)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _conv(url: str, i: int = 0):
    rec = {"messages": [{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "a"}], "images": [url]}
    return record_to_conversation(rec, sample_id=f"s{i}", source=f"d.jsonl:{i + 1}", base_dir="/tmp",
                                  rules=MediaRules(allow_remote=True))


def _opts(tmp_path, **kw) -> FetchOptions:
    kw.setdefault("read_timeout", 0.5)
    kw.setdefault("connect_timeout", 1.0)
    kw.setdefault("max_bytes", 1000)
    kw.setdefault("retries", 1)
    kw.setdefault("allow_private", True)  # the test server is on 127.0.0.1
    return FetchOptions(cache_dir=str(tmp_path / "cache"), **kw)


FIX = "check the URL, or download the image and reference the local file"


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/missing.png", "HTTP 404 Not Found"),
        ("/slow.png", "read timed out after 0.5s (after 2 attempts)"),
        ("/big.png", "the image is 5,000 bytes, above the limit of 1,000"),
        ("/big-unannounced.png", "the image is more than 1,000 bytes, the limit"),
        ("/truncated.png", f"truncated download (20 of {len(PNG):,} bytes) (after 2 attempts)"),
        ("/text.png", "the response is not an image (UnidentifiedImageError; 25 bytes)"),
        ("/loop-a", "redirect loop ('{u}/loop-a' -> '{u}/loop-b' -> '{u}/loop-a')"),
        ("/banner", "HTTP 404 Not Found"),  # the standard phrase, never the server's status line or body
        ("/ssh", "the connection failed (BadStatusLine) (after 2 attempts)"),  # never its banner
    ],
)
def test_each_failure_is_one_exact_problem(server, tmp_path, path, reason):
    conv = _conv(server + path)
    fetch_remote_images([conv], _opts(tmp_path))
    url = server + path
    assert conv.images[0].path is None
    assert conv.read_problems == [Problem(source="d.jsonl:1", what=f"image {url!r} could not be fetched: "
                                          + reason.format(u=server), fix=FIX, sample_id="s0", kind="remote_image")]


def test_ok_redirect_retry_cache_and_dedupe(server, tmp_path):
    opts = _opts(tmp_path)
    convs = [_conv(server + p, i) for i, p in enumerate(["/ok.png", "/same.png", "/hop", "/flaky.png", "/ok.png"])]
    fetch_remote_images(convs, opts)
    assert [c.read_problems for c in convs] == [[]] * 5
    paths = {c.images[0].path for c in convs}
    assert len(paths) == 1  # content-addressed: identical bytes are stored once
    (path,) = paths
    assert open(path, "rb").read() == PNG and path.startswith(str(tmp_path / "cache"))
    assert _Handler.hits["/ok.png"] == 2  # fetched once, plus once through /hop
    # a second read uses the cache, not the network
    before = dict(_Handler.hits)
    again = [_conv(server + "/ok.png")]
    fetch_remote_images(again, opts)
    assert again[0].images[0].path == path and _Handler.hits == before


def test_read_samples_fetches_and_validates(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hfcache"))
    recs = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": server + p}},
                                                      {"type": "text", "text": "q"}]},
                          {"role": "assistant", "content": "a"}]} for p in ("/ok.png", "/missing.png")]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    refused = read_samples(str(data))
    assert [p.kind for c in refused.conversations for p in c.read_problems] == ["remote_image", "remote_image"]
    res = read_samples(ReadArgs(dataset=str(data), dataset_dir=None, allow_remote_images=True, allow_private_remote_images=True))
    ok, bad = res.conversations
    assert ok.read_problems == [] and ok.images[0].path.startswith(str(tmp_path / "hfcache"))
    assert [(p.kind, p.what) for p in bad.read_problems] == [
        ("remote_image", f"image {server + '/missing.png'!r} could not be fetched: HTTP 404 Not Found")]


# -- address policy and deadline (issue 21) -------------------------------------------------------------------
def test_loopback_is_refused_by_default_without_a_request(server, tmp_path):
    before = dict(_Handler.hits)
    host = server.split("//")[1]
    convs = [_conv(server + "/ok.png", 0), _conv(f"http://localhost:{host.split(':')[1]}/ok.png", 1)]
    fetch_remote_images(convs, _opts(tmp_path, allow_private=False))
    (a,), (b,) = (c.read_problems for c in convs)
    assert a.kind == "remote_image" and a.what.endswith(
        "could not be fetched: refused: '127.0.0.1' resolves to loopback address 127.0.0.1; set "
        "allow_private_remote_images: true to fetch from such addresses")
    assert "refused: 'localhost' resolves to loopback address" in b.what  # resolved, not matched by name
    assert _Handler.hits == before and convs[0].images[0].path is None


@pytest.mark.parametrize("address, kind", [("10.1.2.3", "private"), ("192.168.0.1", "private"),
                                           ("169.254.169.254", "link-local"), ("224.0.0.1", "multicast"),
                                           ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
                                           ("fe80::1", "link-local"), ("0.0.0.0", "unspecified"),
                                           ("8.8.8.8", None), ("2606:4700:4700::1111", None)])
def test_address_kinds(address, kind):
    from vlmtune.data.media.remote import _non_public

    assert _non_public(address) == kind


def test_a_redirect_to_a_private_address_is_refused_again(server, tmp_path, monkeypatch):
    from vlmtune.data.media import remote

    real = remote._non_public
    monkeypatch.setattr(remote, "_non_public", lambda a: None if a == "127.0.0.1" else real(a))  # as if public
    conv = _conv(server + "/to-metadata")
    fetch_remote_images([conv], _opts(tmp_path, allow_private=False))
    assert conv.read_problems[0].what.endswith("refused: '169.254.169.254' resolves to link-local address "
                                               "169.254.169.254; set allow_private_remote_images: true to fetch "
                                               "from such addresses")


def test_a_trickling_server_is_cut_off_at_the_deadline(server, tmp_path):
    conv = _conv(server + "/trickle.png")
    fetch_remote_images([conv], _opts(tmp_path, read_timeout=5.0, deadline=0.4))
    assert conv.read_problems[0].what.endswith("could not be fetched: gave up after the deadline of 0.4s for the "
                                               "whole fetch")
    assert conv.images[0].path is None
