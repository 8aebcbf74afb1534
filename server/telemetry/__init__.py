"""Telemetry of the front process: Prometheus metrics, GPU gauges, structured logs.

- `metrics.Metrics`: the `microtune_` families on a private registry, written through methods
  with explicit arguments; `Metrics.start_http_server(port, host)` serves `/metrics`.
- `saturation`: the autoscaling signal and its definition.
- `aggregate`: one pod-wide scrape over several front processes (`PodMetrics`,
  `merge_exposition`).
- `gpu`: NVML sampling behind the `GpuProbe` seam.
- `logs`: JSON/text logging with request fields from a context variable.

The submodules import only prometheus_client, opentelemetry-api, grpc (for status codes) and
`server.types`; pynvml is imported lazily, and only by `gpu.NvmlProbe`.
"""

from server.telemetry.aggregate import PodMetrics, merge_exposition
from server.telemetry.gpu import GpuSample, GpuSampler, NvmlProbe
from server.telemetry.http import MetricsHttpServer
from server.telemetry.logs import request_context, setup_logging
from server.telemetry.metrics import Metrics, ShadowOutcome
from server.telemetry.saturation import capacity_for

__all__ = [
    "GpuSample",
    "GpuSampler",
    "Metrics",
    "MetricsHttpServer",
    "NvmlProbe",
    "PodMetrics",
    "ShadowOutcome",
    "capacity_for",
    "merge_exposition",
    "request_context",
    "setup_logging",
]
