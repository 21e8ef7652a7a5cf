# syntax=docker/dockerfile:1
# Puppet-CNN Serve. Default: NVIDIA GPU image (CUDA runtime base, CUDA torch, onnxruntime-gpu).
# CPU-only image: docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm --build-arg VARIANT=cpu .
# Behind a company mirror, the package sources are build arguments (defaults: PyPI and PyTorch's CPU index):
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST  pip's own settings (empty: pip's default)
#   TORCH_INDEX_URL  the index the CPU image's torch and its dependencies come from (a mirror of PyTorch's CPU index)
#   EXTRA_CA_CERTS   PEM certificates pip trusts besides its own bundle (a TLS-intercepting proxy's, say)
# They reach the build stages only: the runtime image keeps neither the sources nor the certificates.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_TRUSTED_HOST=
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRA_CA_CERTS=

FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The CUDA base has no Python; the python:*-slim base has it already.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1 || ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*; \
    fi

# --- dependencies, in their own layer: rebuilt only when pyproject.toml changes -------------------------
FROM base AS deps
ARG VARIANT=gpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG TORCH_INDEX_URL
ARG EXTRA_CA_CERTS
WORKDIR /build
RUN python3 -m venv /opt/venv
# pip's own certificate bundle plus EXTRA_CA_CERTS; outside the venv, so the runtime image never has it
RUN { cat "$(/opt/venv/bin/python3 -c 'from pip._vendor import certifi; print(certifi.where())')" \
 && printf '%s\n' "$EXTRA_CA_CERTS"; } > /build/pip-ca.pem
ENV PATH=/opt/venv/bin:$PATH \
    PIP_CERT=/build/pip-ca.pem
COPY pyproject.toml README.md ./
# Empty packages (every one pyproject.toml lists) let pip resolve the project's dependencies without its source.
# CPU: the CPU wheel of torch at pyproject.toml's pin (no multi-GB CUDA build). GPU: PyPI's CUDA torch, onnxruntime-gpu instead of onnxruntime.
RUN mkdir -p model service/oip_proto && touch model/__init__.py service/__init__.py service/oip_proto/__init__.py \
 && if [ "$VARIANT" = "cpu" ]; then pip install "$(grep -oE 'torch==[0-9.]+' pyproject.toml)" --index-url "$TORCH_INDEX_URL"; fi \
 && pip install . \
 && pip uninstall -y puppet-cnn-serve \
 && if [ "$VARIANT" = "gpu" ]; then pip uninstall -y onnxruntime && pip install "onnxruntime-gpu>=1.18,<2"; fi

# --- the project itself, as a wheel: rebuilt when model/ or service/ change ------------------------------
FROM deps AS wheel
# the build backend (setuptools) comes from the same sources
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- runtime -------------------------------------------------------------------------------------------
FROM base AS runtime
ARG VARIANT=gpu
LABEL org.opencontainers.image.title="puppet-cnn-serve" \
      org.opencontainers.image.description="Adaptive-depth Puppet-CNN inference service (${VARIANT})"
RUN groupadd --system --gid 10001 puppet && useradd --system --uid 10001 --gid puppet --home-dir /app --no-create-home puppet
COPY --from=deps /opt/venv /opt/venv
# The project is installed like any package (runtime dependencies only, already in the venv; no extras), in a
# layer of its own: a source change leaves the dependencies' layer as it is. /app holds no source, so what
# runs is what `pip install` installed (tests/test_image_install.py installs it the same way).
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels /opt/venv/bin/pip install --no-deps /wheels/*.whl
WORKDIR /app
COPY checkpoints/puppet-cnn-fmnist.safetensors ./checkpoints/
ENV PATH=/opt/venv/bin:$PATH \
    PUPPET_HOST=0.0.0.0 \
    PUPPET_PORT=8000 \
    PUPPET_GRPC_PORT=8001 \
    PUPPET_DEVICE=auto \
    PUPPET_CHECKPOINT=/app/checkpoints/puppet-cnn-fmnist.safetensors
USER 10001:10001
# HTTP (REST, Open Inference Protocol, metrics); the Open Inference Protocol over gRPC
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-m", "service.cli", "serve"]
