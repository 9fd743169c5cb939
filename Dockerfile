# syntax=docker/dockerfile:1
# Offramp inference server on a CUDA PyTorch base. Build from the repository root:
#   docker build -t offramp .
#   docker run --gpus all --ipc=host -p 8000:8000 offramp
# The base ships torch (CUDA build) and Python; it must satisfy pyproject's torch>=2.11 so that
# pip adds only the light dependencies on top. deploy/README.md has the details.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime

# Build-only stage: source tree, wheel build and the model download stay here.
FROM ${BASE_IMAGE} AS builder
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip install --no-cache-dir /wheels/offramp-*.whl
# The default model is fetched at build time so that a container starts with no network.
ENV OFFRAMP_HOME=/opt/offramp
RUN offramp fetch --model smollm2-135m

FROM ${BASE_IMAGE}
# Triton compiles a small C launcher the first time a kernel runs, so the runtime image keeps a
# C compiler ("Failed to find C compiler" otherwise). Versions come from the base image's release;
# pinning Ubuntu package versions breaks the build whenever the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# The wheel is bind-mounted from the builder, so it never becomes a layer of this image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir /wheels/offramp-*.whl
# Numeric uid: Kubernetes' runAsNonRoot can only check a numeric USER.
RUN useradd --no-log-init --create-home --uid 10001 offramp \
 && mkdir /models \
 && chown 10001:10001 /models
COPY --from=builder --chown=10001:10001 /opt/offramp /opt/offramp
# Own models mount at /models: docker run -v /path/to/models:/models:ro ... --model /models/NAME
ENV OFFRAMP_HOME=/opt/offramp \
    PYTHONUNBUFFERED=1
USER 10001
WORKDIR /home/offramp
EXPOSE 8000
# The start period covers model load and the first Triton compilations.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Arguments given to `docker run IMAGE ...` replace CMD and go straight to `offramp serve`;
# keep --host 0.0.0.0 among them, or the server is unreachable from outside the container.
ENTRYPOINT ["offramp", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
