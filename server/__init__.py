"""microtune front process: the gRPC server (KServe v2 / Triton API), routing, telemetry.
Never imports onnxruntime or CUDA: models run in the runtime worker (package `runtime`)."""

__version__ = "0.1.0"
