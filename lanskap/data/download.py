"""Fetching images listed by URL: bounded, verified, retried and resumable.

Each URL is downloaded once into a content cache outside the DVC outputs (`.lanskap-cache/downloads/`,
named by the URL's hash), written atomically, so an interrupted ingest resumes where it stopped and a
rerun skips files already fetched with the expected sha256. Bodies are capped in size and read with a
timeout; redirects may only lead to http(s); content must start with an image format's magic bytes.
"""

import hashlib
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lanskap.data.manifest import ItemRejected, require_sha256
from lanskap.data.images import sniff_image_format
from lanskap.core.io import atomic_file

ALLOWED_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class DownloadPolicy:
    timeout: float  # seconds per connection attempt and per read
    max_bytes: int  # larger bodies are rejected, not truncated
    retries: int  # extra attempts after a transient failure (timeouts, 5xx, resets)
    backoff: float  # seconds before the first retry, doubling after each


class DownloadError(ItemRejected):
    """A URL that cannot give a usable file; the message is the per-item reason."""


class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ALLOWED_SCHEMES:
            raise DownloadError(f"redirect to a non-http(s) URL refused: {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


OPENER = urllib.request.build_opener(HttpOnlyRedirects)


def read_capped(url: str, policy: DownloadPolicy) -> bytes:
    """One attempt: the whole body, or DownloadError for a body over the cap."""
    request = urllib.request.Request(url, headers={"User-Agent": "lanskap-ingest"})
    with OPENER.open(request, timeout=policy.timeout) as response:
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
            raise DownloadError(f"too large: {int(declared)} bytes declared, ingest.max_download_mb allows {policy.max_bytes}")
        body = response.read(policy.max_bytes + 1)
    if len(body) > policy.max_bytes:
        raise DownloadError(f"too large: body exceeds {policy.max_bytes} bytes (ingest.max_download_mb)")
    return body


def is_transient(error: Exception) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code == 429
    return isinstance(error, (urllib.error.URLError, TimeoutError, ConnectionError))


def fetch_with_retries(url: str, policy: DownloadPolicy) -> bytes:
    delay = policy.backoff
    for attempt in range(policy.retries + 1):
        try:
            return read_capped(url, policy)
        except DownloadError:
            raise
        except Exception as error:  # noqa: BLE001 - every network failure becomes a per-item reason
            if not is_transient(error) or attempt == policy.retries:
                raise DownloadError(describe(error, attempt + 1)) from None
            time.sleep(delay)
            delay *= 2


def describe(error: Exception, attempts: int) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason} (after {attempts} attempt(s))"
    reason = getattr(error, "reason", error)
    return f"download failed: {reason} (after {attempts} attempt(s))"


def cache_path(url: str, cache_dir: Path) -> Path:
    """Where the URL's bytes are cached: named by the URL's hash, so no URL or server can choose the path."""
    return cache_dir / hashlib.sha256(url.encode()).hexdigest()


def download(url: str, cache_dir: Path, policy: DownloadPolicy, expected_sha256: str = "") -> bytes:
    """The URL's bytes, from the cache when present (and matching `expected_sha256`), else fetched."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ALLOWED_SCHEMES:
        raise DownloadError(f"unsupported URL scheme {scheme!r}: only http and https are fetched")
    cached = cache_path(url, cache_dir)
    if cached.is_file():
        data = cached.read_bytes()
        if not expected_sha256 or hashlib.sha256(data).hexdigest() == expected_sha256.strip().lower():
            return data
    data = fetch_with_retries(url, policy)
    if sniff_image_format(data) is None:
        raise DownloadError(f"not an image: content starts with {data[:16]!r}")
    require_sha256(data, expected_sha256)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(cached) as staging:
        staging.write_bytes(data)
    return data
