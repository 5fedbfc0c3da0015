"""`make install` takes torch from local wheels, else from the index its device needs.

Read with `make -n install` in a copy of the repo's inputs (no .venv, so the stamp is missing and
the whole recipe prints; nothing runs).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"


def _dockerfile_cpu_index() -> str:
    return re.search(r'TORCH_INDEX="(https://[^"]+)"', (REPO / "Dockerfile").read_text()).group(1)


def install_recipe(tmp_path: Path, device: str) -> list[str]:
    """The shell commands of `make install` for ``device``, continuation lines joined."""
    assert shutil.which("make"), "make is required: the README's two commands are make targets"
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    result = subprocess.run(
        ["make", "-n", "install", f"RAYREC_DEVICE={device}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True,
    )
    joined = result.stdout.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def pip_installs(commands: list[str]) -> list[str]:
    """Every `pip ... install ...` call, alternatives after `||` included."""
    calls = [re.sub(r"\s+\d?>\S+", "", part).strip() for command in commands for part in command.split("||")]
    return [call for call in calls if re.search(r"/pip\b.* install ", call)]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_torch_comes_from_local_wheels_first_and_every_pip_call_is_constrained(tmp_path, device):
    calls = pip_installs(install_recipe(tmp_path, device))
    assert calls and all("-c constraints.txt" in call for call in calls), calls
    torch_calls = [call for call in calls if call.endswith(f" {TORCH}")]
    # 1. a local wheel (find-links only), 2. else an index, 3. torch's own dependencies.
    assert "--no-index --no-deps" in torch_calls[0]
    assert len(torch_calls) == 3 and "--no-index" not in torch_calls[1] + torch_calls[2]
    fbgemm = "fbgemm-gpu==1.8.0" if device == "cuda" else "fbgemm-gpu-cpu==1.8.0"
    assert any(call.endswith(f" {fbgemm}") for call in calls)
    assert calls.index(torch_calls[-1]) < min(i for i, call in enumerate(calls) if "fbgemm" in call)


def test_cpu_machines_fall_back_to_the_cpu_index(tmp_path):
    # Without local wheels, PyPI's torch==2.13.0 is the multi-GB CUDA build.
    commands = install_recipe(tmp_path, "cpu")
    local_first = [command for command in commands if "--no-index" in command and "||" in command]
    assert local_first, "no `pip install --no-index ... || pip install --index-url ...` for torch"
    fallback = local_first[0].split("||")[1]
    assert f"--index-url {_dockerfile_cpu_index()} {TORCH}" in fallback
    assert sum(_dockerfile_cpu_index() in call for call in pip_installs(commands)) == 1


def test_cuda_machines_take_torch_from_the_default_index(tmp_path):
    commands = install_recipe(tmp_path, "cuda")
    assert not any("--index-url" in call or "download.pytorch.org" in call for call in pip_installs(commands))
