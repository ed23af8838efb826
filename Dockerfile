# loraplex on a CUDA machine (docs/server.md, "Docker image"). Never built or run on a GPU yet.
#
# CUDA 13: the default Linux wheel of torch 2.13.0 on PyPI is built against CUDA 13.0 (it
# requires cuda-toolkit==13.0.3 and nvidia-cudnn-cu13 wheels, which bring the CUDA user-space
# libraries; the host needs a driver for CUDA 13). Ubuntu 24.04 gives CPython 3.12. Triton
# (a torch dependency on Linux) compiles its kernel launcher at first use: gcc and the Python
# headers must be in the image. The `eetq` extra installs only on CPython 3.10 (its one CUDA
# wheel); here it is an opt-in (--build-arg EXTRAS=server,eetq) that installs nothing on
# 3.12, and --quantize eetq runs through its pure-torch implementation.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG EXTRAS=server,fleet

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORAPLEX_CACHE=/var/lib/loraplex/cache \
    LORAPLEX_STORE=/var/lib/loraplex/store \
    LORAPLEX_MODEL=default \
    LORAPLEX_DEVICE=cuda \
    LORAPLEX_HOST=0.0.0.0 \
    LORAPLEX_PORT=50051 \
    LORAPLEX_METRICS_PORT=9090 \
    LORAPLEX_GRACE_PERIOD=30 \
    TRITON_CACHE_DIR=/var/lib/loraplex/cache/triton

# gcc + python3-dev: Triton's launcher build; g++: the fused CPU kernels if run with --device cpu.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ libc6-dev \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 loraplex && useradd --create-home --uid 10001 --gid 10001 loraplex \
 && mkdir -p /opt/loraplex /var/lib/loraplex/cache /var/lib/loraplex/store \
 && chown -R loraplex:loraplex /opt/loraplex /var/lib/loraplex

WORKDIR /opt/loraplex
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# 1) torch (the default PyPI wheel: CUDA 13.0, with its pinned triton), 2) the package.
RUN pip install "torch==${TORCH_VERSION}"
COPY --chown=loraplex:loraplex pyproject.toml README.md ./
COPY --chown=loraplex:loraplex loraplex ./loraplex
COPY --chown=loraplex:loraplex server ./server
COPY --chown=loraplex:loraplex client ./client
COPY --chown=loraplex:loraplex adapters_store ./adapters_store
COPY --chown=loraplex:loraplex proto ./proto
RUN pip install "torch==${TORCH_VERSION}" ".[${EXTRAS}]"

# Numeric, so that Kubernetes' runAsNonRoot can verify it (a name cannot be checked).
USER 10001:10001
VOLUME ["/var/lib/loraplex/cache", "/var/lib/loraplex/store"]
EXPOSE 50051 9090 8000

# Health through the standard gRPC health service: SERVING only after the warm-up, which runs
# one request through a (zero) adapter, so Triton's kernels are compiled before traffic.
# `loraplex health` imports the client only (no torch): cheap enough for every probe. --local
# reads the server's own LORAPLEX_HOST / LORAPLEX_PORT / LORAPLEX_TLS_CERT, so the check follows
# another port or TLS (a certificate the server presents is trusted as the root for the probe).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["loraplex", "health", "--local", "--timeout", "4"]

# SIGTERM: NOT_SERVING, in-flight requests get LORAPLEX_GRACE_PERIOD (30 s), then exit.
# Docker's default stop timeout is 10 s: run with `--stop-timeout 40` (compose:
# stop_grace_period: 40s; Kubernetes: terminationGracePeriodSeconds: 40), see docs/server.md.
STOPSIGNAL SIGTERM
LABEL org.loraplex.stop-timeout="40"

# All configuration through LORAPLEX_* environment variables (see docs/server.md).
ENTRYPOINT ["loraplex", "serve"]
