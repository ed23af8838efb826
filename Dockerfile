# loraplex on a CUDA machine. CPython 3.10 so that the `eetq` wheel (CUDA, cp310 only) installs.
# The steps mirror the Makefile: torch first, then the package with its extras, then the
# default model conversion (into the model volume, on first start).
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LORAPLEX_CACHE=/var/lib/loraplex/cache \
    LORAPLEX_STORE=/var/lib/loraplex/store \
    LORAPLEX_MODEL=default \
    LORAPLEX_HOST=0.0.0.0 \
    LORAPLEX_PORT=50051 \
    LORAPLEX_METRICS_PORT=9090

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.10 python3.10-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 loraplex \
 && mkdir -p /opt/loraplex /var/lib/loraplex/cache /var/lib/loraplex/store \
 && chown -R loraplex:loraplex /opt/loraplex /var/lib/loraplex

WORKDIR /opt/loraplex
RUN python3.10 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# 1) torch (CUDA build on this image), 2) the package with the eetq extra.
RUN pip install "torch==2.13.0"
COPY --chown=loraplex:loraplex pyproject.toml README.md ./
COPY --chown=loraplex:loraplex loraplex ./loraplex
COPY --chown=loraplex:loraplex server ./server
COPY --chown=loraplex:loraplex client ./client
COPY --chown=loraplex:loraplex adapters_store ./adapters_store
COPY --chown=loraplex:loraplex proto ./proto
RUN pip install ".[server,eetq]"

USER loraplex
VOLUME ["/var/lib/loraplex/cache", "/var/lib/loraplex/store"]
EXPOSE 50051 9090 8000

# Health through the standard gRPC health service (SERVING only once the model is warm).
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["loraplex", "health", "--address", "127.0.0.1:50051"]

# All configuration through LORAPLEX_* environment variables (see docs/server.md).
ENTRYPOINT ["loraplex", "serve"]
