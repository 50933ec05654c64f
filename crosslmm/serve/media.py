"""What a client's media URLs may make the server read (`MediaPolicy`) and how it reads them: `data:` URLs decoded,
http(s) downloaded from checked public addresses within timeouts and a byte cap, local files only inside allowed
folders; each medium into a temporary file the caller deletes."""

import base64
import binascii
import dataclasses
import http.client
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
import time
import urllib.parse
import urllib.request

from crosslmm.errors import one_line
from crosslmm.serve.checks import RequestError


logger = logging.getLogger("crosslmm.serve")
MAX_REDIRECTS = 5
CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    """What a client's media URLs may reach. The defaults read no local file and no non-public address."""

    allowed_local_paths: tuple[str, ...] = ()  # folders (resolved) whose files a client may name
    allowed_domains: tuple[str, ...] = ()  # when set, the only hosts fetched, at whatever address
    max_bytes: int = 256 << 20  # per medium, and 4/3 of it (base64) plus 1 MiB per request body
    timeout: float = 10.0  # seconds to connect, and between bytes received
    total_timeout: float = 120.0  # seconds for one whole download

    @property
    def max_body_bytes(self) -> int:
        return self.max_bytes * 4 // 3 + (1 << 20)


class FetchRefused(Exception):
    """Why a URL was not fetched, for the server's log; the client gets one generic line whatever the reason."""


def _source_name(url: str) -> str:
    """How messages name a medium: its URL or path, a `data:` URL by its media type and size only."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        media_type = header[len("data:") :].split(";")[0] or "no media type"
        return f"the data: URL ({media_type}, {len(payload)} characters)"
    return url if len(url) <= 200 else url[:200] + "..."


def _too_large(name: str, policy: MediaPolicy) -> RequestError:
    return RequestError(
        f"{name} is larger than this server's limit of {policy.max_bytes} bytes (--max-media-bytes).", 413
    )


def _write_data_url(url: str, out, policy: MediaPolicy):
    """Decode a `data:[<media type>][;base64],<data>` URL (RFC 2397) into the file `out`, a few MiB at a time; the
    size it would decode to is checked first."""
    name = _source_name(url)
    header, comma, payload = url.partition(",")
    if not comma:
        raise RequestError(f"{name} is malformed: no ',' separates its header from its data.")
    if not header.endswith(";base64"):
        data = urllib.parse.unquote_to_bytes(payload)
        if len(data) > policy.max_bytes:
            raise _too_large(name, policy)
        out.write(data)
        return
    if len(payload) // 4 * 3 - 3 > policy.max_bytes:
        raise _too_large(name, policy)
    step = CHUNK * 4  # a multiple of 4 characters decodes on its own
    try:
        for start in range(0, len(payload), step):
            out.write(base64.b64decode(payload[start : start + step], validate=True))
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"{name} does not hold valid base64 data ({error}).") from None


def _local_path(url: str, policy: MediaPolicy) -> str:
    """The real path of a `file://` URL or a plain path inside an allowed folder. One refusal whatever the file is,
    so that nothing about the disk (what exists, what is a video) reaches the client."""
    where = (
        " outside the folders it was started with (--allowed-local-media-path)" if policy.allowed_local_paths else ""
    )
    refusal = RequestError(f"{_source_name(url)}: this server reads no local files{where}.")
    if url.startswith("file:"):
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise refusal
        path = urllib.request.url2pathname(parts.path)
    else:
        path = url
    if not policy.allowed_local_paths or "\0" in path:
        raise refusal
    real = os.path.realpath(os.path.expanduser(path))
    if not any(os.path.commonpath([real, folder]) == folder for folder in policy.allowed_local_paths):
        raise refusal
    return real


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _connect(host: str, port: int, named: bool, policy: MediaPolicy) -> socket.socket:
    """A socket connected to `host`, at an address checked after DNS resolution (the connection goes to that very
    address, so a second lookup cannot swap it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise FetchRefused(f"{host} does not resolve: {error}") from None
    addresses = [info for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
    if not named:
        private = [info[4][0] for info in addresses if not _is_public(info[4][0])]
        if private or not addresses:
            raise FetchRefused(f"{host} resolves to a non-public address ({', '.join(private)})")
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(policy.timeout)
        try:
            sock.connect(address)
            return sock
        except OSError:
            sock.close()
    raise FetchRefused(f"no address of {host} accepts connections")


def _download(url: str, out, policy: MediaPolicy):
    """GET an http(s) URL into `out`, following redirects one by one (each checked as the first URL is), within the
    policy's timeouts and byte cap."""
    deadline = time.monotonic() + policy.total_timeout
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise FetchRefused("bad port") from None
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise FetchRefused(f"not an http(s) URL: {url[:100]}")
        named = host in policy.allowed_domains
        if policy.allowed_domains and not named:
            raise FetchRefused(f"{host} is not among --allowed-media-domains")
        sock = _connect(host, port, named, policy)
        if parts.scheme == "https":
            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            except (OSError, ssl.SSLError) as error:
                sock.close()
                raise FetchRefused(f"TLS with {host} failed: {error}") from None
        connection = http.client.HTTPConnection(host, port, timeout=policy.timeout)
        connection.sock = sock  # the checked address, already connected (and wrapped in TLS for https)
        try:
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            connection.request("GET", target, headers={"User-Agent": "crosslmm-serve", "Accept-Encoding": "identity"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise FetchRefused(f"HTTP {response.status}")
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise _too_large(_source_name(url), policy)
            total = 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FetchRefused(f"not downloaded within {policy.total_timeout} s")
                sock.settimeout(min(policy.timeout, left))
                chunk = response.read1(CHUNK)
                if not chunk:
                    return
                total += len(chunk)
                if total > policy.max_bytes:
                    raise _too_large(_source_name(url), policy)
                out.write(chunk)
        except (OSError, http.client.HTTPException) as error:
            raise FetchRefused(f"{type(error).__name__}: {error}") from None
        finally:
            connection.close()
    raise FetchRefused(f"more than {MAX_REDIRECTS} redirects")


@dataclasses.dataclass
class Medium:
    """A fetched medium: where the processor reads it (a path, or a PIL image) and what messages call it."""

    kind: str  # "video" or "image"
    name: str
    path: str | None = None
    image: object = None


def load_medium(url: str, kind: str, folder: str, policy: MediaPolicy) -> Medium:
    """Fetch or decode one `image_url`/`video_url` into `folder` (a temporary folder the caller deletes). Runs on a
    thread of its own: a download never holds up the event loop or the model."""
    name = _source_name(url)
    if url.startswith("data:") or "://" in url and not url.startswith("file:"):
        fd, path = tempfile.mkstemp(dir=folder)
        with os.fdopen(fd, "wb") as out:
            if url.startswith("data:"):
                _write_data_url(url, out, policy)
            else:
                try:
                    _download(url, out, policy)
                except FetchRefused as reason:
                    logger.warning(f"not fetched: {name}: {reason}")
                    raise RequestError(
                        f"could not fetch {name} (this server fetches media from public http(s) addresses, or the "
                        "hosts it was started with)."
                    ) from None
    else:
        path = _local_path(url, policy)
    if kind == "video":
        return Medium(kind, name, path=path)
    from PIL import Image

    try:
        with Image.open(path) as image:
            return Medium(kind, name, image=image.convert("RGB"))
    except FileNotFoundError:
        raise RequestError(f"Image file not found: {name}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise RequestError(f"{name} is not an image Pillow can read ({one_line(error)}).") from None
