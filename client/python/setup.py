"""Builds the package, generating the gRPC code from the repository's proto/ first.

The generated modules (featurestore/v1/featurestore_pb2.py, its .pyi stubs and
featurestore_pb2_grpc.py) are written into the build directory only: they are never
committed, so they cannot drift from proto/.
"""

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTO_DIR = Path(os.environ.get("FEATURESTORE_PROTO_DIR", HERE.parent.parent / "proto"))
PROTO_FILE = "featurestore/v1/featurestore.proto"


def generate(out: Path) -> None:
    from grpc_tools import protoc
    import grpc_tools

    source = PROTO_DIR / PROTO_FILE
    if not source.is_file():
        raise SystemExit(
            f"cannot find {source}: build from a clone of the feature store repository, "
            "or set FEATURESTORE_PROTO_DIR to its proto/ directory"
        )
    package = out / "featurestore" / "v1"
    package.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(source),
        ]
    )
    if status != 0:
        raise SystemExit(f"protoc failed on {source} with status {status}")
    (package / "__init__.py").write_text('"""Generated from proto/featurestore/v1."""\n')


class BuildWithGeneratedCode(build_py):
    def run(self):
        generate(Path(self.build_lib))
        super().run()


setup(cmdclass={"build_py": BuildWithGeneratedCode})
