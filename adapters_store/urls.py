"""Store backend URLs: parsing `s3://bucket/prefix` and hiding passwords in messages."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

REGISTRY_SCHEMES = ("postgresql", "postgres")


def redact_url(url: str) -> str:
    """The URL with any password replaced by '***' (safe for logs and error messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}{port}", parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class S3Location:
    """`s3://bucket/some/prefix` -> bucket 'bucket', prefix 'some/prefix' (no slashes at the ends)."""

    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def contains(self, other: S3Location) -> bool:
        """True if `other` is this location or lies below it (whole path segments)."""
        if other.bucket != self.bucket:
            return False
        return not self.prefix or other.prefix == self.prefix or other.prefix.startswith(self.prefix + "/")


def parse_s3_url(url: str) -> S3Location:
    """Parse and normalise an s3:// URL; ValueError on anything ambiguous or unsafe."""
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3:// URL (expected s3://bucket/prefix)")
    if any(ch in url for ch in ("\x00", "\\", "?", "#")) or any(ord(ch) < 32 for ch in url):
        raise ValueError(f"{url!r} contains characters not allowed in an s3:// location")
    bucket, _, path = url[len("s3://"):].partition("/")
    if not bucket or not all(c.isalnum() or c in ".-" for c in bucket):
        raise ValueError(f"{url!r}: the bucket name must be letters, digits, '.' and '-'")
    segments = [s for s in path.rstrip("/").split("/")] if path.rstrip("/") else []
    if any(s in ("", ".", "..") for s in segments):
        raise ValueError(f"{url!r}: empty, '.' or '..' path segments are not allowed")
    return S3Location(bucket=bucket, prefix="/".join(segments))
