"""Validate rendered KubeRay manifests offline, strictly enough that a typo fails.

There is no cluster here to ``kubectl apply --dry-run=server`` against, so each layer is checked
against the schema its owner publishes:

- RayCluster / RayJob / RayService against the ``openAPIV3Schema`` of KubeRay's CRDs (a folder of
  CRD YAMLs), with every object schema *closed* (``additionalProperties: false``) the way the API
  server prunes unknown fields, so ``rayStartParms`` or ``enableInTreeAutoscalng`` are errors,
  not silently dropped. ``x-kubernetes-preserve-unknown-fields`` stays open and
  ``x-kubernetes-int-or-string`` accepts both;
- every pod template inside them, and every built-in object (Service, PVC, ConfigMap), against
  Kubernetes' own strict schemas (``kubernetes-validate``);
- ``serveConfigV2`` against Ray Serve's ``ServeDeploySchema`` (pydantic, plus its JSON schema
  closed the same way, because the pydantic model ignores unknown keys);
- the two enums KubeRay checks only in its webhook (``submissionMode``, ``upgradeStrategy.type``);
- rayrec's own pod policy: non-root pods and CPU/memory limits on every container (KubeRay pods
  and the continual-training CronJob's).

Problems are strings that start with ``Kind/name: dotted.path``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")
# KubeRay's JobSubmissionMode and RayServiceUpgradeType values (ray-operator/apis/ray/v1).
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
CRDS_ENV = "RAYREC_KUBERAY_CRDS"


def default_crds_dir() -> Path:
    """``$RAYREC_KUBERAY_CRDS``, else ``../shared/kuberay-crds`` next to the repository."""
    from cluster.manifests import REPO_ROOT

    return Path(os.environ[CRDS_ENV]) if os.environ.get(CRDS_ENV) else REPO_ROOT.parent / "shared" / "kuberay-crds"


def close_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of an OpenAPI/JSON schema where objects with declared properties reject others."""
    closed = copy.deepcopy(schema)
    _close_in_place(closed)
    return closed


def _close_in_place(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _close_in_place(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in node and "additionalProperties" not in node and not preserve:
        node["additionalProperties"] = False
    for key, value in node.items():
        if key in ("properties", "$defs", "definitions"):
            for child in value.values():
                _close_in_place(child)
        elif key in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not"):
            _close_in_place(value)


def load_crd_schemas(crds_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(apiVersion, kind): closed openAPIV3Schema}`` for every CRD YAML in ``crds_dir``."""
    if not Path(crds_dir).is_dir():
        from cluster.manifests import ManifestError

        raise ManifestError(f"KubeRay CRD folder not found: {crds_dir} (pass --crds DIR or set ${CRDS_ENV})")
    schemas = {}
    for path in sorted(Path(crds_dir).glob("*.y*ml")):
        # The CRDs are megabytes of YAML: libyaml's loader is ~10x faster than the pure-Python one.
        for doc in yaml.load_all(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                schema = version.get("schema", {}).get("openAPIV3Schema")
                if schema:
                    schemas[(f"{group}/{version['name']}", kind)] = close_schema(schema)
    return schemas


def validate_documents(docs: list[dict], crd_schemas: dict, k8s_version: str | None = None) -> list[str]:
    """Every problem found in a rendered manifest stream (empty list: valid)."""
    import kubernetes_validate

    version = k8s_version or kubernetes_validate.latest_version()
    problems: list[str] = []
    for doc in docs:
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("kind") in KUBERAY_KINDS:
            problems += _crd_problems(doc, crd_schemas, where)
            problems += _enum_problems(doc, where)
            for path, template in pod_templates(doc):
                problems += _pod_template_problems(template, version, f"{where}: {path}")
            serve_config = doc.get("spec", {}).get("serveConfigV2")
            if doc.get("kind") == "RayService":
                problems += _serve_config_v2_problems(serve_config, where)
        else:
            problems += _builtin_problems(doc, version, where)
            if doc.get("kind") == "CronJob":  # its pods follow rayrec's pod policy too
                template = doc.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {})
                problems += _pod_policy_problems(template.get("spec", {}), f"{where}: spec.jobTemplate.spec.template")
    return problems


def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """``(dotted path, pod template)`` for every pod template in a KubeRay object."""
    spec = doc.get("spec", {})
    cluster_specs = {
        "RayCluster": ("spec", spec),
        "RayService": ("spec.rayClusterConfig", spec.get("rayClusterConfig")),
        "RayJob": ("spec.rayClusterSpec", spec.get("rayClusterSpec")),
    }
    prefix, cluster = cluster_specs.get(doc.get("kind"), ("", None))
    if isinstance(cluster, dict):
        head = cluster.get("headGroupSpec", {})
        if isinstance(head.get("template"), dict):
            yield f"{prefix}.headGroupSpec.template", head["template"]
        for index, group in enumerate(cluster.get("workerGroupSpecs") or []):
            if isinstance(group, dict) and isinstance(group.get("template"), dict):
                yield f"{prefix}.workerGroupSpecs[{index}].template", group["template"]
    if doc.get("kind") == "RayJob" and isinstance(spec.get("submitterPodTemplate"), dict):
        yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]


def serve_config_problems(config: Any) -> list[str]:
    """Problems of a Serve config (already parsed) against Ray Serve's ``ServeDeploySchema``."""
    import jsonschema
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(config, dict):
        return [f"expected a mapping, got {type(config).__name__}"]
    problems = []
    strict = jsonschema.Draft202012Validator(close_schema(ServeDeploySchema.model_json_schema()))
    for error in sorted(strict.iter_errors(config), key=lambda e: list(e.absolute_path)):
        problems.append(_format_error(error))
    if not problems:
        try:
            ServeDeploySchema.model_validate(config)
        except ValueError as err:  # pydantic.ValidationError: names the field and the reason
            problems.append(" ".join(str(err).split()))
    return problems


def _crd_problems(doc: dict, crd_schemas: dict, where: str) -> list[str]:
    import jsonschema

    schema = crd_schemas.get((doc.get("apiVersion"), doc.get("kind")))
    if schema is None:
        return [f"{where}: no CRD schema for {doc.get('apiVersion')} {doc.get('kind')}"]
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{where}: {_format_error(error)}" for error in errors]


def _enum_problems(doc: dict, where: str) -> list[str]:
    spec = doc.get("spec", {})
    problems = []
    if doc.get("kind") == "RayJob" and "submissionMode" in spec and spec["submissionMode"] not in SUBMISSION_MODES:
        problems.append(f"{where}: spec.submissionMode: {spec['submissionMode']!r} is not one of {list(SUBMISSION_MODES)}")
    upgrade = spec.get("upgradeStrategy")
    is_service = doc.get("kind") == "RayService" and isinstance(upgrade, dict)
    if is_service and "type" in upgrade and upgrade["type"] not in UPGRADE_TYPES:
        problems.append(f"{where}: spec.upgradeStrategy.type: {upgrade['type']!r} is not one of {list(UPGRADE_TYPES)}")
    return problems


def _pod_template_problems(template: dict, version: str, where: str) -> list[str]:
    import kubernetes_validate

    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "rayrec-check"}, "template": template}
    problems = []
    try:
        kubernetes_validate.validate(wrapped, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        # Paths are relative to the wrapper: drop its leading "template".
        path = ".".join(_path_parts(list(error.absolute_path)[1:]))
        problems.append(f"{where}{'.' + path if path else ''}: {_error_message(error)}")
    problems += _pod_policy_problems(template.get("spec", {}), where)
    return problems


def _pod_policy_problems(pod_spec: dict, where: str) -> list[str]:
    """rayrec's rules: pods run as non-root and every container has CPU and memory limits."""
    problems = []
    pod_non_root = (pod_spec.get("securityContext") or {}).get("runAsNonRoot") is True
    for index, container in enumerate(pod_spec.get("containers") or []):
        path = f"{where}.spec.containers[{index}]"
        if not pod_non_root and (container.get("securityContext") or {}).get("runAsNonRoot") is not True:
            problems.append(f"{path}.securityContext.runAsNonRoot: must be true (or set on the pod)")
        limits = (container.get("resources") or {}).get("limits") or {}
        for resource in ("cpu", "memory"):
            if resource not in limits:
                problems.append(f"{path}.resources.limits.{resource}: required by rayrec's pod policy")
    return problems


def _serve_config_v2_problems(serve_config: Any, where: str) -> list[str]:
    if not isinstance(serve_config, str) or not serve_config.strip():
        return [f"{where}: spec.serveConfigV2: missing (run `rayrec k8s render`)"]
    try:
        parsed = yaml.safe_load(serve_config)
    except yaml.YAMLError as err:
        return [f"{where}: spec.serveConfigV2: not valid YAML: {err}"]
    return [f"{where}: spec.serveConfigV2: {problem}" for problem in serve_config_problems(parsed)]


def _builtin_problems(doc: dict, version: str, where: str) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(_path_parts(list(error.absolute_path)))
        return [f"{where}: {path + ': ' if path else ''}{_error_message(error)}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"{where}: {error}"]
    return []


def _format_error(error) -> str:
    """``dotted.path: message``; unknown fields are named by their own path."""
    path = _path_parts(list(error.absolute_path))
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = set((error.schema or {}).get("properties", {}))
        extras = sorted(key for key in error.instance if key not in known)
        return "; ".join(f"{'.'.join(path + [extra])}: unknown field" for extra in extras)
    return f"{'.'.join(path) or '<root>'}: {_error_message(error)}"


def _error_message(error) -> str:
    message = error.message
    return message if len(message) <= 300 else message[:297] + "..."


def _path_parts(path: list) -> list[str]:
    parts: list[str] = []
    for item in path:
        if isinstance(item, int) and parts:
            parts[-1] += f"[{item}]"
        else:
            parts.append(str(item))
    return parts


def validate_overlays(crds_dir: Path, overlays: list[str] | None = None) -> dict[str, list[str]]:
    """Render and validate each overlay; ``{"generated": [...], overlay: [problems]}``."""
    from cluster.manifests import (
        kustomize_build,
        load_documents,
        overlay_names,
        stale_generated_files,
    )

    results: dict[str, list[str]] = {
        "generated": [f"{path}: stale, run `rayrec k8s render`" for path in stale_generated_files()]
    }
    crd_schemas = load_crd_schemas(crds_dir)
    for overlay in overlays or overlay_names():
        results[overlay] = validate_documents(load_documents(kustomize_build(overlay)), crd_schemas)
    return results
