"""KubeRay's published RayService CRD (tests/fixtures/kuberay, pinned to v1.7.0) as a JSON schema
that validates the way `kubectl apply --validate=strict` does.

A CRD's `openAPIV3Schema` is a structural schema: the API server prunes unknown fields silently,
and strict validation reports them. jsonschema allows unknown properties unless
`additionalProperties` says otherwise, so every object node that lists `properties` and neither
allows extra fields (`additionalProperties`) nor keeps them (`x-kubernetes-preserve-unknown-fields`)
gets `additionalProperties: false`. Kubernetes' int-or-string fields already carry
`anyOf: [integer, string]`. CEL rules (`x-kubernetes-validations`) are not evaluated here:
`cel_paths` lists where they sit, so that a test can check the manifest sets none of them.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Any, Iterator

import yaml

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kuberay" / "ray.io_rayservices-v1.7.0.yaml.gz"
SHA256 = "0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab"
VERSION = "v1"


def load_crd() -> dict:
    """The CRD document, after checking it is the pinned file byte for byte."""
    data = gzip.decompress(FIXTURE.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise AssertionError(f"{FIXTURE.name} is not the pinned KubeRay CRD (sha256 {digest})")
    return yaml.safe_load(data)


def version_schema(crd: dict, version: str = VERSION) -> dict:
    """The openAPIV3Schema of one served version of the CRD."""
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            assert entry["served"], f"{version} is not served by this CRD"
            return entry["schema"]["openAPIV3Schema"]
    raise KeyError(version)


def strict(schema: Any) -> Any:
    """A copy of a structural schema in which unknown fields are errors (see module docstring)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    keeps_unknown = schema.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in schema and "additionalProperties" not in schema and not keeps_unknown:
        out["additionalProperties"] = False
    return out


def cel_paths(schema: dict, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Paths (field names; `[]` for array items) of the nodes that carry CEL rules."""
    if "x-kubernetes-validations" in schema:
        yield path
    for name, child in schema.get("properties", {}).items():
        yield from cel_paths(child, path + (name,))
    if isinstance(schema.get("items"), dict):
        yield from cel_paths(schema["items"], path + ("[]",))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from cel_paths(schema["additionalProperties"], path + ("*",))


def values_at(document: Any, path: tuple[str, ...]) -> list[Any]:
    """Every value in `document` at `path` (`[]` walks each list item, `*` each map value)."""
    if not path:
        return [document]
    head, rest = path[0], path[1:]
    if head == "[]":
        items = document if isinstance(document, list) else []
    elif head == "*":
        items = list(document.values()) if isinstance(document, dict) else []
    else:
        items = [document[head]] if isinstance(document, dict) and head in document else []
    return [value for item in items for value in values_at(item, rest)]
