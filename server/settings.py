"""The front process's one frozen settings object.

Values come from, in increasing priority: defaults, `MICROTUNE_*` environment variables, CLI
flags (server.cli builds one flag per field). Nothing else in the project reads the environment.
An empty variable counts as unset (`MICROTUNE_MODEL_REPOSITORY=`, what a template leaves for a
value it lacks, served the working directory: `/` in the image); an empty path given as a flag
is refused.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEMO_REPOSITORY", "Settings"]

DEMO_REPOSITORY = Path(__file__).resolve().parent / "demo_repository"
# The longest duration a setting takes (a day), and finite: grpc takes its durations as 32-bit
# milliseconds, a process join as at most ~24.8 days, and a front reads the supervisor's
# settings as JSON, where infinity is null (each front refused it, and was restarted).
MAX_SECONDS = 86_400.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MICROTUNE_",
        env_ignore_empty=True,
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )

    model_repository: Path = DEMO_REPOSITORY
    """Directory of models: <repo>/<model>/[config.pbtxt|config.json] and <version>/model.onnx."""
    grpc_host: str = "127.0.0.1"
    """Address to bind the gRPC server to ("0.0.0.0" or "[::]" in a container; an IPv6
    address is bracketed if given bare: "::1" is "[::1]")."""
    grpc_port: int = Field(8001, ge=0, le=65535)
    """gRPC port; 0 picks a free one (written to --port-file)."""
    port_file: Path | None = None
    """If set, the bound gRPC port is written here once the server listens (a lone front
    listens at once, while its models load; under the supervisor, once they are loaded)."""
    model_control_mode: Literal["none", "explicit", "poll"] = "none"
    """Triton's model control: "none" loads every model at start-up and refuses load/unload
    requests; "explicit" loads --load-model at start-up and obeys RepositoryModelLoad/Unload;
    "poll" also rescans the repository every --repository-poll-s seconds."""
    load_model: str = ""
    """Comma-separated models to load at start-up ("*" = all); explicit mode only."""
    repository_poll_s: float = Field(15.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    """Rescan period of the repository in poll mode."""
    routing_file: Path | None = None
    """JSON routing file ({"models": {name: table}}), re-read when it changes (a mounted
    ConfigMap); see docs/routing.md."""
    metrics_port: int = Field(8002, ge=-1, le=65535)
    """Prometheus /metrics port (on --grpc-host); 0 picks a free one, -1 turns metrics off."""
    tracing: Literal["off", "otlp", "console"] = "off"
    """OpenTelemetry traces: "otlp" exports over OTLP/gRPC, configured by the standard
    OTEL_EXPORTER_OTLP_* variables; "console" prints spans."""
    trace_sampling_ratio: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False)
    """Share of new traces sampled (parent-based: a sampled client trace is always kept)."""
    log_format: Literal["auto", "json", "text"] = "auto"
    """Logs: JSON lines (default when stderr is not a terminal, as in a container) or text."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the front and the worker (any case: "debug" is "DEBUG")."""
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]{1,3})?)$")
    """"auto", "cpu" or "cuda:N" ("cuda" = "cuda:0"): where the worker runs models. Anything
    else is refused (a "gpu" served on the CPU)."""
    worker_threads: int = Field(2, ge=1, le=64)
    """Requests of one model version without dynamic batching that the worker runs at once
    when its config has no instance_group (each version has threads of its own)."""
    intra_op_threads: int = Field(1, ge=0, le=256)
    """onnxruntime intra-op threads per session (0 = onnxruntime's default, all cores)."""
    shm_slot_bytes: int = Field(64 * 1024, ge=4096)
    """Size of one shared-memory slot; a request takes a contiguous run of slots."""
    shm_slots: int = Field(1024, ge=1)
    """Number of slots in each front's arena (arena = slots x slot bytes in /dev/shm)."""
    max_message_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024)
    """Largest gRPC message accepted or sent."""
    max_connection_age_s: float = Field(0.0, ge=0, le=MAX_SECONDS, allow_inf_nan=False)
    """Close each client connection after about this many seconds (gRPC's max connection age:
    a GOAWAY, then the client reconnects on its own), so that long-lived clients spread again
    over front processes and, in Kubernetes, over replicas the autoscaler added; 0 = never."""
    max_connection_age_grace_s: float = Field(0.0, ge=0, le=MAX_SECONDS, allow_inf_nan=False)
    """How long calls and streams still open on a connection past its age may go on; 0 = until
    they end (a ModelStreamInfer stream is never cut; new calls go to the new connection)."""
    shutdown_grace_s: float = Field(30.0, ge=0, le=MAX_SECONDS, allow_inf_nan=False)
    """On SIGTERM: how long the requests in flight (and queued, and open streams) may take to
    be answered before they are cancelled (Triton's --exit-timeout-secs, 30 by default). In
    Kubernetes keep it under terminationGracePeriodSeconds less the preStop sleep (the Helm
    chart derives it so)."""
    shutdown_delay_s: float = Field(0.0, ge=0, le=MAX_SECONDS, allow_inf_nan=False)
    """On SIGTERM: how long to go on serving, not ready (readiness NOT_SERVING, ServerReady
    false), before the drain: a load balancer that health-checks the server moves traffic away
    meanwhile, where a closed listener would only refuse it. 0 in Kubernetes, where the preStop
    sleep does this (the pod leaves the Service's endpoints first)."""
    worker_start_timeout_s: float = Field(60.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    """How long the worker may take to start listening."""
    strict_readiness: bool = True
    """Readiness (and ServerReady) also requires every model to be available: none whose
    config fails or whose version failed to load (Triton's --strict-readiness, also on by
    default). Only models the server was asked to serve count: not those explicit mode left
    unloaded at start-up, nor those unloaded by request. So a rolling update whose models fail
    to load stops instead of replacing serving pods; false: ready once loads have finished."""
    restart_limit: int = Field(8, ge=0)
    """A runtime worker (or, under the supervisor, a front) that dies this many times within
    --restart-window-s makes the server give up and exit with code 70, so that its container
    is restarted (crash-looping) instead of respawning it for ever; restarts wait longer after
    each death. 0 = never give up."""
    restart_window_s: float = Field(600.0, gt=0, le=MAX_SECONDS, allow_inf_nan=False)
    """How long a death counts toward --restart-limit."""
    allow_client_shm: bool = False
    """Allow clients to register system shared-memory regions for inputs and outputs
    (Triton's --allow-client-shm); off by default because it maps client-named objects."""
    dynamic_batching: bool = True
    """Honour each model's dynamic_batching config; false runs every request alone (the
    comparison point of the batching benchmark)."""
    frontends: int = Field(0, ge=0, le=64)
    """gRPC front processes sharing the port (SO_REUSEPORT) and one worker; 0 = sized to the
    machine (one per two usable CPUs, cgroup CPU limit included, at most 4)."""
    cpu_graphs: bool = False
    """Testing: run batched models through the CUDA-graph executor on the CPU EP, so CPU-only
    machines exercise the GPU serving path (bucketing, padding, registry, per-version thread)."""
    fake_cuda_ipc: bool = False
    """Testing: accept CUDA shared-memory registrations on a CPU worker, a POSIX shm object
    standing in for device memory (its "handle" names it), so CPU-only machines exercise the
    CUDA shared-memory path (registration, binding in place, copies into regions)."""
    worker_socket: str = ""
    """Internal: the socket of a worker owned by the supervisor (set for front processes)."""
    frontend_index: int = Field(0, ge=0)
    """Internal: this front's index under the supervisor."""
    server_name: str = "triton"
    """Name reported by ServerMetadata. Defaults to "triton" because Triton clients (its own
    example programs among them) check it; the version field carries microtune's version."""

    # Each check is a field's: its error names the field, so that server.cli can say which flag
    # or variable the user set wrong.

    @field_validator("model_repository", "routing_file", "port_file", mode="before")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        """("" is Path("."): the working directory, taken for a repository or a file.)"""
        if isinstance(value, str) and not value.strip():
            raise ValueError("an empty path")
        return value

    @field_validator("shm_slot_bytes")
    @classmethod
    def _whole_pages(cls, value: int) -> int:
        if value % 4096:
            raise ValueError("must be a multiple of 4096")
        return value

    @field_validator("port_file")
    @classmethod
    def _a_file_in_a_directory(cls, value: Path | None) -> Path | None:
        if value is not None and (value.is_dir() or not value.parent.is_dir()):
            raise ValueError("not a file in an existing directory")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("grpc_host")
    @classmethod
    def _bracketed(cls, host: str) -> str:
        """gRPC's addresses put an IPv6 host in brackets: "::1:8001" reads as [::0.1.0.0]:443,
        and the server said the address was in use."""
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return host
        return f"[{host}]"
