# microtune image. CPU by default; GPU: --build-arg EXTRAS=gpu on a CUDA 13 capable host
# (onnxruntime-gpu brings its CUDA/cuDNN wheels; only the driver comes from the node).
# Run with room in /dev/shm for one 64 MiB arena per front: docker run --shm-size=1g ...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY runtime ./runtime
RUN python -m venv /opt/microtune \
 && /opt/microtune/bin/pip install --no-cache-dir ".[${EXTRAS}]"

FROM ${PYTHON_IMAGE}
# tini as PID 1: forwards SIGTERM so the server drains (readiness off, in-flight requests finish).
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin microtune
COPY --from=build /opt/microtune /opt/microtune
ENV PATH=/opt/microtune/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MICROTUNE_GRPC_HOST=0.0.0.0 \
    MICROTUNE_LOG_FORMAT=json
USER 10001
EXPOSE 8001 8002
# No HEALTHCHECK: Kubernetes ignores it; probes use grpc.health.v1 (services liveness/readiness).
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["microtune", "serve"]
