"""cluster/: launcher YAMLs pass Ray's own validation, KubeRay/PodMonitor manifests use real CRD
field names, RayJobs name existing jobs, the dashboard queries only metrics that exist."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))

def _task_jobs() -> set[str]:
    from avmoe.tasks import list_tasks

    return set(list_tasks())

# Field names of the KubeRay v1 CRDs, from ray-project/kuberay ray-operator/apis/ray/v1/
# rayjob_types.go (RayJobSpec) and raycluster_types.go (RayClusterSpec, HeadGroupSpec,
# WorkerGroupSpec, AutoscalerOptions) -- json tags as published. A typo in a manifest is silently
# dropped by the API server's pruning, so it is worth catching here.
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
               "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
               "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                   "autoscalerOptions", "headServiceAnnotations", "suspend"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                "template", "scaleStrategy"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts",
                      "securityContext", "idleTimeoutSeconds", "upscalingMode"}
# core/v1 PodSpec / Container fields these manifests use (subset of the Kubernetes API)
POD_SPEC = {"containers", "serviceAccountName", "nodeSelector", "tolerations", "volumes", "affinity",
            "initContainers", "imagePullSecrets", "priorityClassName"}
CONTAINER = {"name", "image", "env", "envFrom", "ports", "resources", "volumeMounts", "command", "args",
             "lifecycle", "securityContext", "imagePullPolicy"}
# monitoring.coreos.com/v1 PodMonitor
PODMONITOR_SPEC = {"jobLabel", "podTargetLabels", "podMetricsEndpoints", "selector", "namespaceSelector",
                   "sampleLimit", "targetLimit", "labelLimit", "attachMetadata"}
POD_METRICS_ENDPOINT = {"port", "portNumber", "targetPort", "path", "scheme", "params", "interval",
                        "scrapeTimeout", "honorLabels", "honorTimestamps", "relabelings",
                        "metricRelabelings", "basicAuth", "bearerTokenSecret", "tlsConfig", "filterRunning",
                        "enableHttp2", "followRedirects", "proxyUrl", "oauth2", "authorization"}
RELABEL = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"}


def _unknown(d: dict, allowed: set[str], where: str) -> list[str]:
    return [f"{where}.{k}" for k in d if k not in allowed]


def test_every_yaml_parses():
    files = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
    assert len(files) >= 8
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        assert docs, f


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_passes_ray_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(path.read_text())
    validate_config(copy.deepcopy(cfg))  # Ray's ray-schema.json + its own checks, offline
    validate_config(prepare_config(copy.deepcopy(cfg)))  # after Ray fills in its defaults
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")  # no work on the head
    assert "head_node" not in cfg and "worker_nodes" not in cfg  # not the legacy format
    gpu = [t for n, t in types.items() if "gpu" in n]
    ingest = [t for n, t in types.items() if "ingest" in t["resources"]]
    assert gpu and ingest
    text = json.dumps([gpu, ingest])
    assert ("MarketType" in text and "spot" in text) or "SPOT" in text  # spot / preemptible workers
    assert any("pip install" in c and "-e ." in c for c in cfg["setup_commands"])  # installs avmoe
    # the validator is real: a misspelt top-level key is refused
    bad = copy.deepcopy(cfg)
    bad["setup_comands"] = []
    with pytest.raises(Exception):
        validate_config(bad)


def _check_cluster_spec(spec: dict, where: str) -> list[str]:
    errs = _unknown(spec, RAYCLUSTER_SPEC, where)
    errs += _unknown(spec.get("autoscalerOptions", {}), AUTOSCALER_OPTIONS, where + ".autoscalerOptions")
    head = spec["headGroupSpec"]
    errs += _unknown(head, HEAD_GROUP, where + ".headGroupSpec")
    groups = [(where + ".headGroupSpec", head)] + [
        (f"{where}.workerGroupSpecs[{g.get('groupName')}]", g) for g in spec.get("workerGroupSpecs", [])]
    for w, g in groups[1:]:
        errs += _unknown(g, WORKER_GROUP, w)
    for w, g in groups:
        pod = g["template"]["spec"]
        errs += _unknown(pod, POD_SPEC, w + ".template.spec")
        for c in pod["containers"]:
            errs += _unknown(c, CONTAINER, w + ".containers")
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), w  # CRD: map[string]string
    assert head["rayStartParams"].get("num-cpus") == "0"  # no work on the head
    assert any("nvidia.com/gpu" in json.dumps(g["template"]) for _, g in groups[1:])
    assert any("ingest" in g["rayStartParams"].get("resources", "") for _, g in groups[1:])
    return errs


def test_kuberay_manifests_use_crd_field_names():
    kinds = {}
    errs: list[str] = []
    selectors: list[dict] = []
    cluster_labels: dict = {}
    for f in KUBERAY:
        d = yaml.safe_load(f.read_text())
        assert d["apiVersion"] == "ray.io/v1", f
        kinds.setdefault(d["kind"], []).append(f.name)
        if d["kind"] == "RayJob":
            errs += _unknown(d["spec"], RAYJOB_SPEC, f"{f.name}.spec")
            # the cluster spec is written once (raycluster.yaml); every RayJob selects that cluster
            assert "rayClusterSpec" not in d["spec"], f
            selectors.append(d["spec"]["clusterSelector"])
            assert "s3://" in d["spec"]["entrypoint"]  # checkpoints/results on object storage
        else:
            assert d["kind"] == "RayCluster"
            errs += _check_cluster_spec(d["spec"], f"{f.name}.spec")
            cluster_labels = d["metadata"]["labels"]
    assert not errs, errs
    assert len(kinds["RayCluster"]) == 1 and len(kinds["RayJob"]) == len(_task_jobs())
    for sel in selectors:  # the selector matches the one RayCluster
        assert sel and all(cluster_labels.get(k) == v for k, v in sel.items()), (sel, cluster_labels)
    # the checker is real: a misspelt field is reported
    assert _unknown({"shutdownAfterJobFinish": True}, RAYJOB_SPEC, "x")


def test_rayjobs_name_existing_job_scripts():
    """Each RayJob runs `python jobs/<task>.py ...`, one per task, and that file exists."""
    named = set()
    for f in KUBERAY:
        d = yaml.safe_load(f.read_text())
        if d["kind"] != "RayJob":
            continue
        m = re.match(r"\s*python (jobs/(\w+)\.py)\b", d["spec"]["entrypoint"])
        assert m, d["spec"]["entrypoint"]
        named.add(m.group(2))
        assert (REPO / m.group(1)).is_file(), f"{f.name}: {m.group(1)} does not exist"
    assert named == _task_jobs()


def test_podmonitors():
    docs = list(yaml.safe_load_all((CLUSTER / "monitoring/podmonitor.yaml").read_text()))
    assert {d["metadata"]["name"] for d in docs} >= {"ray-head-monitor", "ray-workers-monitor",
                                                     "avmoe-workers-monitor"}
    errs = []
    for d in docs:
        assert d["apiVersion"] == "monitoring.coreos.com/v1" and d["kind"] == "PodMonitor"
        assert d["metadata"]["labels"]["release"] == "prometheus"
        errs += _unknown(d["spec"], PODMONITOR_SPEC, d["metadata"]["name"])
        for ep in d["spec"]["podMetricsEndpoints"]:
            errs += _unknown(ep, POD_METRICS_ENDPOINT, d["metadata"]["name"] + ".endpoint")
            for r in ep.get("relabelings", []):
                errs += _unknown(r, RELABEL, d["metadata"]["name"] + ".relabeling")
    assert not errs, errs
    # the avmoe endpoints are the worker pods' named container ports
    rc = yaml.safe_load((CLUSTER / "kuberay/raycluster.yaml").read_text())
    ports = {p["name"] for g in rc["spec"]["workerGroupSpecs"]
             for c in g["template"]["spec"]["containers"] for p in c.get("ports", [])}
    avmoe = next(d for d in docs if d["metadata"]["name"] == "avmoe-workers-monitor")
    assert {ep["port"] for ep in avmoe["spec"]["podMetricsEndpoints"]} <= ports
    assert all(ep["honorLabels"] for ep in avmoe["spec"]["podMetricsEndpoints"])


# ---------------------------------------------------------------------------- metric names


def _ray_metric_names() -> set[str]:
    """Metric names Ray 2.60 exports, read from the installed Ray's own dashboard panel
    definitions (the Grafana dashboards Ray generates query exactly these)."""
    import ray

    root = Path(ray.__file__).parent / "dashboard/modules/metrics/dashboards"
    names: set[str] = set()
    for f in root.glob("*_panels.py"):
        names |= set(re.findall(r"\bray_[a-z0-9_]+", f.read_text()))
    return names


def _our_metric_names() -> set[str]:
    """Names a WorkerMetrics instance exports (from its registry), plus the NVML ones that only
    exist on a GPU machine."""
    from avmoe.telemetry import GPU_METRICS, WorkerMetrics
    from avmoe.telemetry.gpu import GPU_METRIC_NAMES

    assert set(GPU_METRIC_NAMES) == set(GPU_METRICS)
    m = WorkerMetrics(job="j", task="ave", rank=0, node="127.0.0.1", sd_dir="", strict=True)
    names = {s.name for fam in m.registry.collect() for s in fam.samples}
    names |= {fam.name for fam in m.registry.collect()}
    return names | set(GPU_METRICS)


def test_dashboard_queries_only_exported_metrics():
    dash = json.loads((CLUSTER / "monitoring/grafana-avmoe-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    queried = set()
    for e in exprs:
        queried |= set(re.findall(r"\b(?:avmoe|ray)_[a-z0-9_]+", e))
    ours, rays = _our_metric_names(), _ray_metric_names()
    assert "ray_node_gpus_utilization" in rays and "ray_data_spilled_bytes" in rays  # the source is right
    unknown = sorted(n for n in queried if n not in ours and n not in rays)
    assert not unknown, f"dashboard queries metrics nobody exports: {unknown}"
    # the panels the issue asks for
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for want in ("gpu utilisation", "gpu memory", "mfu", "samples/s", "data wait", "spill",
                 "object-store", "loss", "validation", "expert usage", "checkpoint"):
        assert want in titles, want
    assert any(p["type"] == "heatmap" for p in dash["panels"])
    # Ray already exports node GPU util/memory and Ray Data: the dashboard uses Ray's for those
    assert "ray_node_gpus_utilization" in queried and "ray_node_gram_used" in queried


def test_metric_naming_conventions():
    from avmoe.telemetry import GPU_METRICS, METRICS

    rays = _ray_metric_names()
    for name, (kind, _) in {**METRICS, **GPU_METRICS}.items():
        assert re.fullmatch(r"avmoe_[a-z0-9_]+", name), name
        assert (kind == "counter") == name.endswith("_total"), name
        assert not name.endswith("_percent"), name  # ratios in 0..1, as Prometheus recommends
        assert name not in rays
    # units in names where there is a unit
    for name in METRICS:
        if any(w in name for w in ("duration", "seconds", "wait")):
            assert "_seconds" in name or name.endswith("_ratio"), name


def test_prometheus_config_discovers_ray_and_workers():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    from avmoe.telemetry.worker import DEFAULT_PORT, DEFAULT_PORT_SLOTS, DEFAULT_SD_DIR

    path = CLUSTER / "monitoring/prometheus.yml"
    cfg = yaml.safe_load(path.read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    ray_files = jobs["ray"]["file_sd_configs"][0]["files"]
    assert ray_files == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    assert jobs["avmoe-local"]["file_sd_configs"][0]["files"] == [f"{DEFAULT_SD_DIR}/*.json"]
    slots = sorted(int(j["relabel_configs"][-1]["replacement"].rsplit(":", 1)[1])
                   for n, j in jobs.items() if n.startswith("avmoe-slot-"))
    assert slots == list(range(DEFAULT_PORT, DEFAULT_PORT + DEFAULT_PORT_SLOTS))
    assert all(j.get("honor_labels") for n, j in jobs.items() if n.startswith("avmoe"))
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) not installed: syntax not checked by Prometheus")
    r = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_config_for_another_temp_dir(tmp_path, capsys):
    from avmoe.telemetry.prometheus_config import main

    assert main(["--ray-temp-dir", "/mnt/ray/", "--sd-dir", "/srv/avmoe_sd"]) == 0
    text = capsys.readouterr().out
    assert "/tmp/ray" not in text and "/tmp/avmoe" not in text
    cfg = yaml.safe_load(text)
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["ray"]["file_sd_configs"][0]["files"][0].startswith("/mnt/ray/")
    assert jobs["avmoe-local"]["file_sd_configs"][0]["files"] == ["/srv/avmoe_sd/*.json"]
    template = yaml.safe_load((CLUSTER / "monitoring/prometheus.yml").read_text())
    assert len(cfg["scrape_configs"]) == len(template["scrape_configs"])  # nothing else changed
    promtool = shutil.which("promtool")
    if promtool is not None:
        (tmp_path / "p.yml").write_text(text)
        r = subprocess.run([promtool, "check", "config", str(tmp_path / "p.yml")], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
