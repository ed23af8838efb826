"""Generate the Python gRPC stubs for proto/loraplex/v1/*.proto into loraplex/v1/.

Usage: python scripts/gen_proto.py [--out DIR]

The output is deterministic for a given grpcio-tools version (pinned in pyproject.toml);
tests/unit/test_proto_stubs.py regenerates into a temporary directory and fails when the
checked-in stubs differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "loraplex" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) over every proto file; return the files written."""
    from grpc_tools import protoc
    import grpc_tools

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    pkg = out_dir / "loraplex" / "v1"
    return sorted(p for p in pkg.iterdir() if p.suffix in (".py", ".pyi") and p.name != "__init__.py")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo root)")
    args = parser.parse_args()
    written = generate(args.out)
    for path in written:
        print(f"generated {path.relative_to(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
