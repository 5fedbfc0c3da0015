"""The image installs what `make install` installs (no Docker engine here, so it is read, not built)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def _pip_installs(text: str) -> list[str]:
    """Package arguments of every `pip install` line, options and variables dropped."""
    installs = []
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for match in re.finditer(r"(?:\$\(PIP\)|(?<![\w-])pip) install ([^\n&\\]+)", code):
        words = [w.strip("'\"") for w in match.group(1).split()]
        skip_next = False
        for word in words:
            if skip_next:
                skip_next = False
                continue
            if word in ("-c", "--index-url"):
                skip_next = True
            elif not word.startswith(("-", "$")):
                installs.append(word)
    return installs


def test_image_installs_the_makefile_packages_in_the_same_order():
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile[makefile.index("$(STAMP):"):makefile.index("demo:")]
    expected = [p.replace("'.[dev]'", ".").replace(".[dev]", ".") for p in _pip_installs(recipe)]
    # The Makefile's $(FBGEMM) is the CUDA or CPU build; the Dockerfile names both by VARIANT.
    expected = [p for p in expected if p]
    found = _pip_installs(DOCKERFILE)
    assert [p for p in found if "fbgemm" not in p] == [p for p in expected if "fbgemm" not in p]
    assert '"fbgemm-gpu==1.8.0"' in DOCKERFILE and '"fbgemm-gpu-cpu==1.8.0"' in DOCKERFILE
    assert "--no-deps torchrec==1.8.0" in DOCKERFILE
    assert "python -m embeddings.csrc.build" in DOCKERFILE and "$(PY) -m embeddings.csrc.build" in recipe
    assert DOCKERFILE.count("-c constraints.txt") == 5


def test_image_runs_as_the_non_root_user_the_manifests_expect():
    assert "USER 1000:1000" in DOCKERFILE
    for manifest in (REPO / "k8s" / "base").glob("ray*.yaml"):
        assert "runAsUser: 1000" in manifest.read_text(), manifest


def test_dockerignore_keeps_environments_and_outputs_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv/", ".git/", "runs/", "/data/"} <= set(ignored)
