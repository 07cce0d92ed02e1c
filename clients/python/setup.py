"""Generate the protobuf code from the repository's proto/ before the package is built.

The generated modules are never edited by hand and never committed: `make proto` writes them for
development, and these hooks write them when a distribution is built: the wheel (`build_py`) and the sdist
(`sdist`), so a wheel built later from the sdist, away from proto/, carries them too.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

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


class SdistWithProto(sdist):
    """sdist that writes the generated protobuf modules first (package data, so they travel inside it)."""

    def run(self) -> None:
        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithProto, "sdist": SdistWithProto})
