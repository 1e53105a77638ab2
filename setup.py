"""Build hook: generate the gRPC stubs from proto/ with grpcio-tools (never committed).

``proto/p2r/v1/*.proto`` (package ``p2r.v1``) compiles to the Python modules ``p2r.v1.*_pb2``,
which land in ``p2r/v1/`` of the source tree: editable installs import them from there and
wheels package them.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def generate_stubs() -> None:
    from grpc_tools import protoc

    root = Path(__file__).parent
    protos = sorted(str(p.relative_to(root / "proto")) for p in (root / "proto").rglob("*.proto"))
    args = ["protoc", f"-I{root / 'proto'}", f"--python_out={root}", f"--pyi_out={root}",
            f"--grpc_python_out={root}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(protos))


class BuildWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
