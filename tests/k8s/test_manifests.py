"""The KubeRay manifests: every overlay renders (kubectl kustomize) and validates; typos fail.

Validation uses the real KubeRay CRD schemas (../shared/kuberay-crds or $RAYREC_KUBERAY_CRDS),
Kubernetes' strict schemas (kubernetes-validate) and Ray Serve's ServeDeploySchema.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml

from cluster.manifest_validation import (
    KUBERAY_KINDS,
    close_schema,
    default_crds_dir,
    load_crd_schemas,
    pod_templates,
    validate_documents,
)
from cluster.manifests import (
    generated_files,
    kustomize_build,
    load_documents,
    overlay_names,
    render_serve_config,
    stale_generated_files,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def crd_schemas():
    return load_crd_schemas(default_crds_dir())


@pytest.fixture(scope="module")
def gpu_docs() -> list[dict]:
    return load_documents(kustomize_build("gpu"))


def find(docs: list[dict], kind: str) -> dict:
    return next(doc for doc in docs if doc["kind"] == kind)


def test_overlays_exist():
    assert overlay_names() == ["gpu", "local-cpu"]


def test_validate_cli_accepts_every_overlay(capsys):
    from cluster.cli import main

    assert main(["k8s", "validate", "--crds", str(default_crds_dir())]) == 0
    assert capsys.readouterr().out.splitlines() == ["generated: ok", "gpu: ok", "local-cpu: ok"]


def test_rendered_overlays_hold_the_promised_objects(gpu_docs):
    local = load_documents(kustomize_build("local-cpu"))
    for docs in (local, gpu_docs):
        assert {doc["kind"] for doc in docs} == {
            "ConfigMap", "Service", "PersistentVolumeClaim", "RayCluster", "RayJob", "RayService", "CronJob",
        }
        cluster = find(docs, "RayCluster")
        assert cluster["spec"]["enableInTreeAutoscaling"] is True
        assert find(docs, "RayJob")["spec"]["entrypoint"].count("rayrec train --config /config/") == 1
        assert find(docs, "Service")["spec"]["ports"][0]["port"] == 8000
        serve_config = yaml.safe_load(find(docs, "RayService")["spec"]["serveConfigV2"])
        assert serve_config["applications"][0]["args"]["run_dir"] == "/storage/runs/ml100k"
    assert "/config/tiny.yaml" in find(local, "RayJob")["spec"]["entrypoint"]
    gpu_groups = [g for g in find(gpu_docs, "RayCluster")["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu_groups[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    configmap = find(gpu_docs, "ConfigMap")
    names = ("ml100k.yaml", "ml100k-gpu.yaml", "tiny.yaml")
    assert configmap["data"] == {name: (REPO / "configs" / name).read_text() for name in names}


def _containers(docs: list[dict]):
    for doc in docs:
        if doc["kind"] in KUBERAY_KINDS:
            for path, template in pod_templates(doc):
                for container in template["spec"]["containers"]:
                    yield f"{doc['kind']}/{doc['metadata']['name']}: {path}", container


def test_gpu_overlay_runs_the_cuda_image_on_the_gpu_group_only(gpu_docs):
    # An `images:` rewrite with newTag once turned the GPU group's rayrec:cuda into rayrec:cpu.
    gpu_group = next(g for g in find(gpu_docs, "RayCluster")["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    (container,) = gpu_group["template"]["spec"]["containers"]
    assert container["image"] == "rayrec:cuda"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    others = {where: c["image"] for where, c in _containers(gpu_docs) if c is not container}
    assert others and set(others.values()) == {"rayrec:cpu"}, others


def test_gpu_overlay_trains_the_gpu_config(gpu_docs):
    from training.config import load_config

    entrypoint = find(gpu_docs, "RayJob")["spec"]["entrypoint"]
    assert "rayrec train --config /config/ml100k-gpu.yaml " in entrypoint
    assert find(gpu_docs, "ConfigMap")["data"]["ml100k-gpu.yaml"] == (REPO / "configs" / "ml100k-gpu.yaml").read_text()
    cfg = load_config(REPO / "configs" / "ml100k-gpu.yaml")
    assert cfg.scaling.use_gpu is True
    # The same run as configs/ml100k.yaml otherwise.
    cpu = load_config(REPO / "configs" / "ml100k.yaml")
    assert cfg.model_dump(exclude={"scaling"}) == cpu.model_dump(exclude={"scaling"})
    assert cfg.scaling.model_dump(exclude={"use_gpu"}) == cpu.scaling.model_dump(exclude={"use_gpu"})
    # The other overlay keeps training on CPU.
    local = find(load_documents(kustomize_build("local-cpu")), "RayJob")["spec"]["entrypoint"]
    assert "ml100k-gpu" not in local



def _mount_holding(path: str, container: dict) -> dict:
    """The volumeMount a file under ``path`` lands on (the deepest mountPath containing it)."""
    target = PurePosixPath(path)
    mounts = [m for m in container.get("volumeMounts", []) if PurePosixPath(m["mountPath"]) in (target, *target.parents)]
    assert mounts, f"{path} is on no volume of container {container['name']} (the image's own filesystem)"
    return max(mounts, key=lambda m: len(PurePosixPath(m["mountPath"]).parts))


@pytest.mark.parametrize("overlay", ["gpu", "local-cpu"])
def test_feedback_log_is_on_the_writable_pvc_in_every_serve_pod(overlay):
    # POST /feedback is acknowledged only once durable: the log must outlive the pod (a PVC, not
    # the container's /app/data/feedback) and be writable by the uid 1000 Serve processes.
    docs = load_documents(kustomize_build(overlay))
    service = find(docs, "RayService")
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    feedback_dir, run_dir = args["feedback_dir"], args["run_dir"]
    assert PurePosixPath(feedback_dir).is_absolute(), feedback_dir
    claims = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "PersistentVolumeClaim"}
    templates = list(pod_templates(service))
    assert len(templates) == 2  # head + serve workers: a FeedbackSink replica may run on either
    for where, template in templates:
        spec = template["spec"]
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        security = spec["securityContext"]
        assert security["runAsUser"] == 1000 and security["fsGroup"] == security["runAsGroup"] == 1000, where
        for container in spec["containers"]:
            mount = _mount_holding(feedback_dir, container)
            claim = volumes[mount["name"]].get("persistentVolumeClaim")
            assert claim and claim["claimName"] in claims, f"{where}: {feedback_dir} is not on a PVC: {mount}"
            assert not mount.get("readOnly") and not claim.get("readOnly"), f"{where}: {feedback_dir} is read-only"
            # Everything else the serve pods see on the volume (the run they serve) stays read-only.
            assert _mount_holding(run_dir, container).get("readOnly") is True, where
    if overlay == "gpu":  # serve pods on several nodes append to one log
        assert "ReadWriteMany" in claims[claim["claimName"]]["spec"]["accessModes"]

def test_render_is_deterministic_and_committed_files_are_fresh():
    assert generated_files() == generated_files()
    assert kustomize_build("gpu") == kustomize_build("gpu")
    # Fails after serving/serve_config.yaml or configs/{ml100k,ml100k-gpu,tiny}.yaml change: run `rayrec k8s render`.
    assert stale_generated_files() == [], "k8s/base/generated/ is stale: run `rayrec k8s render`"


def test_render_rejects_a_broken_serve_config(tmp_path: Path):
    broken = tmp_path / "serve_config.yaml"
    config = yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text())
    config["applications"][0]["deployments"][0]["max_ongoing_requestz"] = 3
    broken.write_text(yaml.safe_dump(config))
    with pytest.raises(Exception, match=r"applications\[0\]\.deployments\[0\]\.max_ongoing_requestz: unknown field"):
        render_serve_config(broken)


def _break(docs: list[dict], kind: str, edit) -> list[dict]:
    broken = copy.deepcopy(docs)
    edit(find(broken, kind))
    return broken


def _set_serve_config(doc: dict, key: str, value) -> None:
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    config["applications"][0]["deployments"][0][key] = value
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(config)


BROKEN = {
    "crd typo": (
        "RayCluster",
        lambda d: d["spec"].__setitem__("enableInTreeAutoscalng", True),
        "RayCluster/rayrec: spec.enableInTreeAutoscalng: unknown field",
    ),
    "nested crd typo": (
        "RayCluster",
        lambda d: d["spec"]["headGroupSpec"].__setitem__("rayStartParms", {"num-cpus": "1"}),
        "RayCluster/rayrec: spec.headGroupSpec.rayStartParms: unknown field",
    ),
    "crd wrong type": (
        "RayCluster",
        lambda d: d["spec"]["workerGroupSpecs"][0].__setitem__("maxReplicas", "four"),
        "RayCluster/rayrec: spec.workerGroupSpecs[0].maxReplicas: 'four' is not of type 'integer'",
    ),
    "submission mode": (
        "RayJob",
        lambda d: d["spec"].__setitem__("submissionMode", "K8sMode"),
        "RayJob/rayrec-train: spec.submissionMode: 'K8sMode' is not one of",
    ),
    "upgrade strategy": (
        "RayService",
        lambda d: d["spec"]["upgradeStrategy"].__setitem__("type", "BlueGreen"),
        "RayService/rayrec-service: spec.upgradeStrategy.type: 'BlueGreen' is not one of",
    ),
    "pod template typo": (
        "RayCluster",
        lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__("imagePullPolcy", "Always"),
        "RayCluster/rayrec: spec.headGroupSpec.template.spec.containers[0]: Additional properties are not allowed ('imagePullPolcy'",
    ),
    "submitter pod typo": (
        "RayJob",
        lambda d: d["spec"]["submitterPodTemplate"]["spec"].__setitem__("restartPolice", "Never"),
        "RayJob/rayrec-train: spec.submitterPodTemplate.spec: Additional properties are not allowed ('restartPolice'",
    ),
    "serveConfigV2 typo": (
        "RayService",
        lambda d: _set_serve_config(d, "max_ongoing_requestz", 3),
        "RayService/rayrec-service: spec.serveConfigV2: applications[0].deployments[0].max_ongoing_requestz: unknown field",
    ),
    "serveConfigV2 bad value": (
        "RayService",
        lambda d: _set_serve_config(d, "max_ongoing_requests", "many"),
        "RayService/rayrec-service: spec.serveConfigV2: applications[0].deployments[0].max_ongoing_requests: 'many' is not of type 'integer'",
    ),
    "root user allowed": (
        "RayCluster",
        lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"].pop("securityContext"),
        "spec.workerGroupSpecs[0].template.spec.containers[0].securityContext.runAsNonRoot: must be true",
    ),
    "no memory limit": (
        "RayService",
        lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"].pop("memory"),
        "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].resources.limits.memory: required",
    ),
    "cron job typo": (
        "CronJob",
        lambda d: d["spec"].__setitem__("concurrencyPolice", "Forbid"),
        "CronJob/rayrec-continual: spec: Additional properties are not allowed ('concurrencyPolice'",
    ),
    "cron job pod without limits": (
        "CronJob",
        lambda d: d["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["resources"].pop("limits"),
        "CronJob/rayrec-continual: spec.jobTemplate.spec.template.spec.containers[0].resources.limits.cpu: required",
    ),
    "built-in kind typo": (
        "Service",
        lambda d: d["spec"]["ports"][0].__setitem__("targetPrt", 8000),
        "Service/rayrec-http: spec.ports[0]: Additional properties are not allowed ('targetPrt'",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_manifest_fails_naming_the_field(case, gpu_docs, crd_schemas):
    kind, edit, expected = BROKEN[case]
    assert validate_documents(gpu_docs, crd_schemas) == []
    problems = validate_documents(_break(gpu_docs, kind, edit), crd_schemas)
    assert problems, f"{case}: the broken manifest passed validation"
    assert any(expected in problem for problem in problems), problems


def test_int_or_string_fields_take_both(gpu_docs, crd_schemas):
    def integer_cpu(doc):
        doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 2

    assert validate_documents(_break(gpu_docs, "RayCluster", integer_cpu), crd_schemas) == []


def test_close_schema_keeps_preserve_unknown_fields_open_and_accepts_int_or_string():
    schema = close_schema({
        "type": "object",
        "properties": {
            "strict": {"type": "object", "properties": {"a": {"type": "string"}}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {"type": "string"}}},
            "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
            "bare": {"x-kubernetes-int-or-string": True},
        },
    })
    validator = jsonschema.Draft7Validator(schema)
    assert not list(validator.iter_errors({"free": {"a": "x", "b": 1}, "port": 80, "bare": "http"}))
    assert not list(validator.iter_errors({"port": "http", "bare": 8080}))
    assert list(validator.iter_errors({"strict": {"b": 1}}))
    assert list(validator.iter_errors({"typo": 1}))
    assert list(validator.iter_errors({"bare": [1]}))


@pytest.mark.parametrize("overlay", ["local-cpu", "gpu"])
def test_continual_cronjob_submits_the_continue_job_and_never_overlaps(overlay, capsys):
    # The schedule of issue #29: `rayrec train --continue` on the RayJob's run and serving's
    # feedback log, submitted to the RayCluster; a tick never starts while one still trains.
    from cluster.cli import main

    cron = find(load_documents(kustomize_build(overlay)), "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"]
    assert command[:3] == ["rayrec", "submit", "command"] and "--follow" in command
    assert command[command.index("--address") + 1] == "http://rayrec-head-svc:8265"
    assert {e["name"] for e in container["env"]} == {"RAY_AUTH_TOKEN"}
    # rayrec's own CLI takes the command as written (a dry run prints the submission)
    split = command.index("--")
    assert main([*command[1:split], "--dry-run", *command[split:]]) == 0
    submission = json.loads(capsys.readouterr().out)
    assert submission["entrypoint"] == "rayrec train --continue /storage/runs/ml100k --feedback /storage/feedback"
    # the run it continues is the one the RayJob trains and the RayService serves
    rayjob = find(load_documents(kustomize_build(overlay)), "RayJob")["spec"]["entrypoint"]
    assert "--run-id ml100k --runs-dir /storage/runs" in rayjob
