"""Import a PEFT adapter directory from object storage (`s3://bucket/path/`) into a staging directory.

Only locations under an operator-allowed prefix (`--adapter-source s3://bucket/prefix`) are read;
'..', '.', empty segments and other buckets are refused before any request is made. Sizes are
checked from the listing before downloading, and again while streaming; the files then go
through the same validation as an upload (AdapterStore._commit_staged).
"""

from __future__ import annotations

from typing import Callable

from .errors import AdapterValidationError, PermissionDenied
from .paths import CONFIG_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME
from .staging import HashingWriter, StagingDir
from .urls import S3Location, parse_s3_url

_CHUNK = 1 << 20


def allowed_location(url: str, allowed: tuple[str, ...]) -> S3Location:
    """The parsed location if it lies under one of the allowed prefixes, else PermissionDenied."""
    if not allowed:
        raise PermissionDenied("registration from object storage is disabled: no adapter sources are configured "
                               "(start the server with --adapter-source s3://bucket/prefix)")
    try:
        location = parse_s3_url(url)
    except ValueError as error:
        raise PermissionDenied(f"refused: {error}") from None
    if not any(parse_s3_url(prefix).contains(location) for prefix in allowed):
        raise PermissionDenied(f"{location.url} is outside the allowed adapter sources {list(allowed)}")
    return location


def fetch_adapter(url: str, allowed: tuple[str, ...], staging: StagingDir, max_config_bytes: int,
                  max_adapter_bytes: int, client_factory: Callable) -> tuple[list[str], int]:
    """Download config and weights of the adapter at `url` into `staging`: ([config, weights] sha256, bytes)."""
    location = allowed_location(url, allowed)
    from .blobs_s3 import unavailable_on_error

    client = client_factory()
    try:
        what = f"the adapter source {location.url}"
        sizes = _list_files(client, location, what)
        digests, total = [], 0
        for name, limit in ((CONFIG_NAME, max_config_bytes), (WEIGHTS_NAME, max_adapter_bytes)):
            if sizes[name] > limit:
                raise AdapterValidationError("size_limit", f"{location.url}/{name} is {sizes[name]} bytes, above "
                                             f"the limit of {limit}; raise --max-adapter-bytes or use a smaller adapter")
            writer = HashingWriter(staging.file(name))
            try:
                with unavailable_on_error(what):
                    body = client.get_object(Bucket=location.bucket, Key=location.key(name))["Body"]
                    for chunk in body.iter_chunks(_CHUNK):
                        if writer.num_bytes + len(chunk) > limit:
                            raise AdapterValidationError("size_limit", f"{location.url}/{name} is larger than "
                                                         f"the limit of {limit} bytes")
                        writer.write(chunk)
                digests.append(writer.finish())
                total += writer.num_bytes
            finally:
                writer.close()
        return digests, total
    finally:
        client.close()


def _list_files(client, location: S3Location, what: str) -> dict[str, int]:
    """{file name: size} of the objects directly inside the location (checked for the two PEFT files)."""
    from botocore.exceptions import ClientError

    from .blobs_s3 import error_code, unavailable_on_error

    sizes: dict[str, int] = {}
    try:
        with unavailable_on_error(what):
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=location.bucket, Prefix=location.key() + "/", Delimiter="/"):
                for item in page.get("Contents", ()):
                    sizes[item["Key"].rsplit("/", 1)[-1]] = int(item["Size"])
    except ClientError as error:
        raise AdapterValidationError("missing_file", f"cannot list {location.url}: "
                                     f"{error_code(error) or error}") from None
    if WEIGHTS_NAME not in sizes:
        pickles = sorted(name for name in sizes if name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise AdapterValidationError("pickle_format", f"{location.url} holds only pickle weights {pickles}; "
                                         f"loraplex never unpickles. Re-save with safetensors "
                                         f"(save_pretrained(..., safe_serialization=True))")
        raise AdapterValidationError("missing_file", f"{location.url}/ has no {WEIGHTS_NAME}; give the PEFT "
                                     f"adapter directory holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    if CONFIG_NAME not in sizes:
        raise AdapterValidationError("missing_file", f"{location.url}/ has no {CONFIG_NAME}")
    return sizes
