"""Remote images (`allow_remote_images: true`): fetched once into a content-addressed cache.

Each distinct http(s) URL is fetched once, in parallel, into `<datasets cache>/vlmtune_images/`:
the file is named by the SHA-256 of its bytes (identical images are stored once) and a small index
file per URL (named by the URL's SHA-256) points at it, so a second read never touches the network.
A fetch has a per-image size cap, separate connect and read timeouts, a total deadline (all attempts,
redirects and reads together: a server that trickles a byte a second cannot hold it longer), a bounded number
of retries (connection errors, timeouts, 5xx and 429 only) and of redirects, and a content check (the bytes
must be an image Pillow identifies, from its header). Every failure becomes a `remote_image`
problem of the sample naming the URL and the reason; nothing raises. A reason never quotes the server's
bytes (status phrases come from the standard table, not the response; exceptions by type only).

Addresses: the host is resolved here and every address it resolves to must be public: loopback, private,
link-local (cloud metadata services), multicast, reserved and unspecified addresses are refused, at the first
URL and again at each redirect, unless `allow_private_remote_images` is set. The connection goes to the
address that was checked (not a second lookup), so a name cannot resolve differently between check and use.

Hand-written on http.client rather than urllib.request because urllib has one timeout for connect
and reads and follows redirects on its own.
"""

from __future__ import annotations

import hashlib
import http
import http.client
import ipaddress
import os
import socket
import ssl
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ...config import ReadArgs
from ...errors import Problem
from ..types import Conversation, ImagePart
from .images import read_header
from .paths import HTTP_RE as _HTTP_RE
from .paths import quoted as _q

MAX_BYTES = 50 * 1024 * 1024
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
RETRIES = 2
MAX_REDIRECTS = 5
WORKERS = 8
DEADLINE = 120.0

_FIX = "check the URL, or download the image and reference the local file"
_USER_AGENT = "vlmtune (image fetch)"


@dataclass(frozen=True)
class FetchOptions:
    max_bytes: int = MAX_BYTES
    connect_timeout: float = CONNECT_TIMEOUT
    read_timeout: float = READ_TIMEOUT
    retries: int = RETRIES
    max_redirects: int = MAX_REDIRECTS
    workers: int = WORKERS
    cache_dir: str | None = None  # default: the datasets cache
    deadline: float = DEADLINE  # seconds for the whole fetch of one URL: attempts, redirects, reads
    allow_private: bool = False  # allow_private_remote_images: loopback, private, link-local, multicast addresses


def fetch_options(read: ReadArgs) -> FetchOptions:
    """The fetch options the read section's remote_image_* keys and allow_private_remote_images ask for."""
    return FetchOptions(max_bytes=read.remote_image_max_bytes, connect_timeout=read.remote_image_timeout,
                        read_timeout=read.remote_image_timeout, deadline=read.remote_image_deadline,
                        allow_private=read.allow_private_remote_images)


class FetchError(Exception):
    def __init__(self, reason: str, retry: bool = False):
        super().__init__(reason)
        self.reason, self.retry = reason, retry


def cache_dir(opts: FetchOptions) -> str:
    if opts.cache_dir:
        return opts.cache_dir
    root = os.environ.get("HF_DATASETS_CACHE")  # read now: datasets.config reads it once, at import
    if not root:
        import datasets.config

        root = str(datasets.config.HF_DATASETS_CACHE)
    return os.path.join(root, "vlmtune_images")


def _sha(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()


def fetch(url: str, opts: FetchOptions = FetchOptions()) -> str:
    """The cached file of one URL (fetched if not yet cached), or FetchError with the reason."""
    root = cache_dir(opts)
    index = os.path.join(root, "urls", _sha(url.encode()))
    try:
        with open(index, encoding="utf-8") as f:
            cached = os.path.join(root, f.read().strip())
        if os.path.isfile(cached):
            return cached
    except OSError:
        pass
    attempt = 0
    deadline = time.monotonic() + opts.deadline
    while True:
        try:
            data = _get(url, opts, deadline)
            break
        except FetchError as e:
            if not e.retry or attempt >= opts.retries or time.monotonic() >= deadline:
                if attempt:
                    raise FetchError(f"{e.reason} (after {attempt + 1} attempts)") from None
                raise
            time.sleep(0.2 * 2**attempt)
            attempt += 1
    try:
        header = read_header(data)
    except Exception as e:
        raise FetchError(f"the response is not an image ({type(e).__name__}; {len(data):,} bytes)") from None
    name = f"{_sha(data)}.{(header.format or 'img').lower()}"
    os.makedirs(os.path.join(root, "urls"), exist_ok=True)
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        _atomic_write(path, data)
    _atomic_write(index, name.encode())
    return path


def _atomic_write(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def _get(url: str, opts: FetchOptions, deadline: float) -> bytes:
    seen = [url]
    for _ in range(opts.max_redirects + 1):
        status, location, data = _request(url, opts, deadline)
        if status in (301, 302, 303, 307, 308):
            if not location:
                raise FetchError(f"HTTP {status} redirect without a Location")
            url = urllib.parse.urljoin(url, location)
            if not _HTTP_RE.match(url):
                raise FetchError(f"redirected to {_q(url)}, which is not http(s)")
            if url in seen:
                raise FetchError(f"redirect loop ({' -> '.join(_q(u) for u in [*seen, url])})")
            seen.append(url)
            continue  # the next _request checks the new host's addresses again
        return data
    raise FetchError(f"more than {opts.max_redirects} redirects")


def public_address(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to for host: its first resolved address, each of them checked to be public
    (unless allow_private); FetchError naming the refused address otherwise."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise FetchError(f"cannot resolve the host ({getattr(e, 'strerror', None) or type(e).__name__})",
                         retry=True) from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise FetchError("the host resolves to no address")
    if not allow_private:
        for a in addresses:
            kind = _non_public(a)
            if kind:
                raise FetchError(f"refused: {_q(host)} resolves to {kind} address {a}; set "
                                 "allow_private_remote_images: true to fetch from such addresses")
    return addresses[0]


def _non_public(address: str) -> str | None:
    """What kind of non-public address this is ('loopback', 'private', ...), or None for a public one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is 127.0.0.1
    ip = mapped or ip
    for kind in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None


class _Watchdog:
    """Shuts the socket down when the deadline passes, so that no blocked read (headers or body, however slowly
    the server trickles) outlives it."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.fired = False
        self._sock = sock
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self):
        self.fired = True
        with _suppress():
            self._sock.shutdown(socket.SHUT_RDWR)

    def cancel(self):
        self._timer.cancel()


def _request(url: str, opts: FetchOptions, deadline: float) -> tuple[int, str | None, bytes]:
    parts = urllib.parse.urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise FetchError("the URL has an invalid port") from None
    if not host:
        raise FetchError("the URL has no host")
    https = parts.scheme.lower() == "https"
    port = port or (443 if https else 80)
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError(f"gave up after the deadline of {opts.deadline:g}s for the whole fetch")
    address = public_address(host, port, opts.allow_private)
    cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
    conn = cls(host, port, timeout=opts.connect_timeout)
    watchdog = None
    try:
        try:  # to the address that was checked, not to whatever a second lookup of the name returns
            sock = socket.create_connection((address, port), timeout=min(opts.connect_timeout, left))
        except (socket.timeout, TimeoutError):
            raise FetchError(f"connect timed out after {opts.connect_timeout:g}s", retry=True) from None
        except OSError as e:
            raise FetchError(f"cannot connect: {e.strerror or type(e).__name__}", retry=True) from None
        watchdog = _Watchdog(sock, deadline)
        if https:
            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            except (ssl.SSLError, OSError) as e:
                sock.close()
                raise FetchError(f"TLS failed: {type(e).__name__}", retry=not isinstance(e, ssl.SSLError)) from None
        sock.settimeout(opts.read_timeout)
        conn.sock = sock
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", target, headers={"User-Agent": _USER_AGENT, "Accept": "image/*"})
            resp = conn.getresponse()
            status = resp.status
            if status in (301, 302, 303, 307, 308):
                return status, resp.getheader("Location"), b""
            if status == 429 or status >= 500:
                raise FetchError(f"HTTP {status}{_phrase(status)}", retry=True)
            if status != 200:
                raise FetchError(f"HTTP {status}{_phrase(status)}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > opts.max_bytes:
                raise FetchError(f"the image is {int(length):,} bytes, above the limit of {opts.max_bytes:,}")
            data = _read_capped(resp, opts.max_bytes)
            if watchdog.fired:  # the socket was shut down under the read: what came is not the whole image
                raise _past_deadline(opts)
            if length and length.isdigit() and len(data) != int(length):
                raise FetchError(f"truncated download ({len(data):,} of {int(length):,} bytes)", retry=True)
            return status, None, data
        except (socket.timeout, TimeoutError):
            raise FetchError(f"read timed out after {opts.read_timeout:g}s", retry=True) from None
        except http.client.IncompleteRead as e:
            if watchdog.fired:
                raise _past_deadline(opts) from None
            got = len(e.partial)
            want = f" of {got + e.expected:,}" if e.expected is not None else ""
            raise FetchError(f"truncated download ({got:,}{want} bytes)", retry=True) from None
        except (http.client.HTTPException, OSError) as e:
            if watchdog.fired:
                raise _past_deadline(opts) from None
            # by type only: an exception's text may quote what the server sent (a status line, a banner)
            raise FetchError(f"the connection failed ({type(e).__name__})", retry=True) from None
    finally:
        if watchdog is not None:
            watchdog.cancel()
        conn.close()


def _past_deadline(opts: FetchOptions) -> FetchError:
    return FetchError(f"gave up after the deadline of {opts.deadline:g}s for the whole fetch")


def _phrase(status: int) -> str:
    """The standard reason phrase of a status (never the one the server sent)."""
    try:
        return " " + http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _read_capped(resp, cap: int) -> bytes:
    chunks, total = [], 0
    while True:
        chunk = resp.read(min(1 << 16, cap + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > cap:
            raise FetchError(f"the image is more than {cap:,} bytes, the limit")


def fetch_remote_images(conversations: list[Conversation], opts: FetchOptions = FetchOptions(),
                        progress: bool = True) -> None:
    """Fetch every http(s) image of the conversations; set each part's path, or add the problem."""
    urls = list(dict.fromkeys(
        p.ref for c in conversations for m in c.messages for p in m.parts
        if isinstance(p, ImagePart) and p.path is None and _HTTP_RE.match(p.ref)
    ))
    if not urls:
        return
    results: dict[str, str | FetchError] = {}

    def one(url: str):
        try:
            return url, fetch(url, opts)
        except FetchError as e:
            return url, e
        except Exception as e:  # a cache folder that cannot be written, ...
            return url, FetchError(f"{type(e).__name__}: {e}")

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=max(1, min(opts.workers, len(urls)))) as pool:
        with tqdm(total=len(urls), desc="fetching images", unit="image",
                  disable=not progress or len(urls) < 50 or None) as bar:
            for url, result in pool.map(one, urls):
                results[url] = result
                bar.update(1)
    for conv in conversations:
        for m in conv.messages:
            for j, p in enumerate(m.parts):
                if not (isinstance(p, ImagePart) and p.path is None and p.ref in results):
                    continue
                got = results[p.ref]
                if isinstance(got, FetchError):
                    conv.read_problems.append(Problem(
                        source=conv.source, what=f"image {_q(p.ref)} could not be fetched: {got.reason}", fix=_FIX,
                        sample_id=conv.id, kind="remote_image"))
                else:
                    m.parts[j] = ImagePart(ref=p.ref, path=got)
