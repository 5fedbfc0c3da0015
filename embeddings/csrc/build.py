"""Build (once) and locate the shared library behind ``torch.ops.rayrec.zero_collision_hash``.

Why not ``torch.utils.cpp_extension.load``: it needs ninja and pybind11-style modules, and its
build folder is keyed by name only. The kernel is one translation unit that registers a torch
op (``TORCH_LIBRARY``), so one ``g++`` call against the venv's torch headers is enough (about
10 s on 2 cores). The library is cached under a key made of the source, the headers beside it,
the torch version and the compile command, so a changed kernel or a different torch rebuilds
and an unchanged one never does. Several processes (Ray workers) may race to build: each
compiles into its own temp file and the atomic ``os.replace`` makes the last one win with an
identical file.

Run ``python -m embeddings.csrc.build`` (what ``make install`` does) to build ahead of time.
Set ``RAYREC_EXTENSION_DIR`` to move the cache (default ``~/.cache/rayrec/extensions``) and
``CXX`` to pick the compiler.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils import cpp_extension

SOURCE = Path(__file__).with_name("zch_insert.cpp")


def extension_dir() -> Path:
    """Where built libraries are cached (created on demand)."""
    default = Path.home() / ".cache" / "rayrec" / "extensions"
    path = Path(os.environ.get("RAYREC_EXTENSION_DIR", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def compile_command(source: Path, output: Path) -> list[str]:
    """The g++ command line for one torch-op translation unit (no Python, no pybind11)."""
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [flag for path in cpp_extension.include_paths() for flag in ("-isystem", path)]
    libraries = [flag for path in cpp_extension.library_paths() for flag in (f"-L{path}", f"-Wl,-rpath,{path}")]
    return [
        os.environ.get("CXX", "g++"),
        "-O3",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-Wall",
        "-fopenmp",  # at::parallel_for's pragmas; links torch/lib's libgomp (found first), the same team torch uses
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *includes,
        str(source),
        "-o",
        str(output),
        *libraries,
        "-lc10",
        "-ltorch_cpu",
    ]


def library_path(source: Path = SOURCE) -> Path:
    """The cached library's path for this source, its headers, torch and compile command (may
    not exist)."""
    key = hashlib.sha256()
    key.update(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):
        key.update(header.name.encode())
        key.update(header.read_bytes())
    key.update(torch.__version__.encode())
    key.update(" ".join(compile_command(Path("src.cpp"), Path("out.so"))).encode())
    return extension_dir() / f"rayrec_{source.stem}_{key.hexdigest()[:16]}.so"


def build(source: Path = SOURCE, verbose: bool = False) -> Path:
    """Compile ``source`` unless its cached library exists; return the library's path."""
    target = library_path(source)
    if target.exists():
        return target
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    command = compile_command(source, partial)
    if verbose:
        print(" ".join(command), file=sys.stderr)
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"building {source.name} failed (exit {result.returncode}):\n"
                f"{' '.join(command)}\n{result.stderr[-4000:]}"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
