"""Content-addressed blobs in an S3-compatible bucket (AWS, MinIO, Ceph, R2) through boto3.

Objects are `<prefix>/blobs/sha256/ab/abcdef...`, written once with a conditional put
(`If-None-Match: *`: an existing blob is never overwritten). Reads go through a local
BlobCache; the caller verifies the sha256 of every cold load. Credentials, region and
endpoint come from the standard AWS chain (env such as AWS_ENDPOINT_URL, profiles, config
files). Network failures raise StoreUnavailable (UNAVAILABLE to clients, with a retry hint).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .blob_cache import BlobCache
from .blobs import blob_relpath, is_digest
from .errors import StoreUnavailable
from .urls import parse_s3_url

_MISSING = ("404", "NoSuchKey", "NotFound")


def s3_client(timeout_s: float = 10.0):
    """A boto3 S3 client from the standard AWS environment/config chain, failing fast when unreachable."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=timeout_s, read_timeout=max(timeout_s, 30.0),
                    retries={"max_attempts": 2, "mode": "standard"})
    return boto3.session.Session().client("s3", config=config)


@contextmanager
def unavailable_on_error(what: str) -> Iterator[None]:
    """Map connection-level boto errors (and 5xx) to StoreUnavailable naming `what`."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as error:
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status >= 500:
            raise StoreUnavailable(f"{what} answered HTTP {status}; retry shortly") from None
        raise
    except BotoCoreError as error:
        raise StoreUnavailable(f"{what} is unreachable ({error}); retry shortly") from None


def error_code(error: Exception) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


class S3BlobStore:
    """Blobs under `s3://bucket/prefix/blobs/sha256/`, cached under `cache_dir` up to `cache_bytes`."""

    shared = True

    def __init__(self, url: str, cache_dir: Path, cache_bytes: int, client_factory: Callable = s3_client):
        self.location = parse_s3_url(url)
        self.url = self.location.url
        self._client = client_factory()
        self.cache = BlobCache(cache_dir, cache_bytes)

    def _key(self, digest: str) -> str:
        return self.location.key(blob_relpath(digest))

    def check(self) -> None:
        from botocore.exceptions import ClientError

        try:
            with unavailable_on_error(f"the blob store {self.url}"):
                self._client.head_bucket(Bucket=self.location.bucket)
        except ClientError as error:
            raise StoreUnavailable(f"the blob store {self.url} cannot be used: bucket "
                                   f"{self.location.bucket!r} {_explain(error)}") from None

    def close(self) -> None:
        self._client.close()

    def exists(self, digest: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            with unavailable_on_error(f"the blob store {self.url}"):
                self._client.head_object(Bucket=self.location.bucket, Key=self._key(digest))
        except ClientError as error:
            if error_code(error) in _MISSING:
                return False
            raise
        return True

    def put(self, staged: Path, digest: str) -> None:
        """Upload once (conditional put: a blob already there is kept), then keep the file in the cache."""
        from botocore.exceptions import ClientError

        try:
            with unavailable_on_error(f"the blob store {self.url}"), open(staged, "rb") as body:
                self._client.put_object(Bucket=self.location.bucket, Key=self._key(digest), Body=body,
                                        IfNoneMatch="*")
        except ClientError as error:
            if error_code(error) not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise
        self.cache.put_file(staged, digest)

    def read(self, digest: str) -> bytes:
        cached = self.cache.get(digest)
        if cached is not None:
            return cached
        from botocore.exceptions import ClientError

        try:
            with unavailable_on_error(f"the blob store {self.url}"):
                data = self._client.get_object(Bucket=self.location.bucket, Key=self._key(digest))["Body"].read()
        except ClientError as error:
            if error_code(error) in _MISSING:
                raise FileNotFoundError(f"{self.url}/{blob_relpath(digest)}") from None
            raise
        self.cache.put_bytes(digest, data)
        return data

    def remove(self, digest: str) -> None:
        with unavailable_on_error(f"the blob store {self.url}"):
            self._client.delete_object(Bucket=self.location.bucket, Key=self._key(digest))
        self.cache.drop(digest)

    def list_digests(self) -> set[str]:
        return {name for name, _ in self._listing() if is_digest(name)}

    def remove_unreferenced(self, referenced: Callable[[], set[str]]) -> list[str]:
        """Delete objects (and strays) under the blob prefix no row refers to; the removed keys.

        The caller holds the registry's `collecting()`."""
        keep = referenced()
        removed = []
        for name, key in self._listing():
            if name not in keep or not key.endswith(blob_relpath(name) if is_digest(name) else "\0"):
                with unavailable_on_error(f"the blob store {self.url}"):
                    self._client.delete_object(Bucket=self.location.bucket, Key=key)
                if is_digest(name):
                    self.cache.drop(name)
                removed.append(key)
        return removed

    def total_bytes(self) -> int:
        total = 0
        for page in self._pages():
            total += sum(item["Size"] for item in page.get("Contents", ()))
        return total

    def _pages(self):
        prefix = self.location.key("blobs", "sha256") + "/"
        with unavailable_on_error(f"the blob store {self.url}"):
            paginator = self._client.get_paginator("list_objects_v2")
            yield from paginator.paginate(Bucket=self.location.bucket, Prefix=prefix)

    def _listing(self) -> list[tuple[str, str]]:
        return [(item["Key"].rsplit("/", 1)[-1], item["Key"]) for page in self._pages()
                for item in page.get("Contents", ())]


def _explain(error: Exception) -> str:
    code = error_code(error)
    if code in ("404", "NoSuchBucket", "NotFound"):
        return "does not exist; create it first"
    if code in ("403", "AccessDenied"):
        return "is not accessible with these credentials (AWS_* env, profile)"
    return f"answered {code or error}"
