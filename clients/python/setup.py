"""Generate the protobuf code from the repository's proto/ before the package is built.

The generated modules are never edited by hand and never committed: `make proto` writes them for
development, and this hook writes them when the distribution is built (`pip install ./clients/python`).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto" / "patchscope" / "v1"


def generate() -> None:
    if not PROTO_ROOT.is_dir():  # an sdist: the generated files travel inside it
        return
    from grpc_tools import protoc

    args = [
        "grpc_tools.protoc",
        f"-Ipatchscope_client/_proto={PROTO_ROOT}",
        f"--python_out={HERE}",
        f"--grpc_python_out={HERE}",
        f"--pyi_out={HERE}",
        str(PROTO_ROOT / "patchscope.proto"),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on proto/patchscope/v1/patchscope.proto")


class BuildWithProto(build_py):
    """build_py that writes the generated protobuf modules first."""

    def run(self) -> None:
        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithProto})
