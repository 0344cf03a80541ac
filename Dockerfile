# syntax=docker/dockerfile:1
# birdwatch's image: a builder stage makes the wheel, the runtime stage installs only that wheel (its dependencies
# from PyPI) and runs as UID 10001. No Docker engine is needed to check the install steps: hack/check-wheel.sh
# builds the same wheel and installs it into a clean virtualenv.
#
#   docker build -t ghcr.io/otomato-gh/birdwatch:0.1.0 .
#   docker run --rm ghcr.io/otomato-gh/birdwatch:0.1.0 --help

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: the wheel ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The build context is filtered by .dockerignore: packaging files and src/ only matter here.
COPY . .
RUN python -m pip wheel --no-deps -w /dist .

# --- runtime --------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="birdwatch" \
      org.opencontainers.image.description="Kubernetes controller that releases canaries safely on an Istio service mesh" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/otomato-gh/birdwatch" \
      org.opencontainers.image.vendor="otomato" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The wheel is mounted from the builder for this one step, so it never becomes a layer of the image. pip compiles
# the .pyc files at install time: the container's root filesystem is read-only at run time.
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    python -m pip install /dist/*.whl

# A numeric, non-root user: Kubernetes' runAsNonRoot can only verify a numeric UID.
RUN groupadd --system --gid 10001 birdwatch \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin birdwatch
USER 10001:10001
WORKDIR /

# /healthz, /readyz and /metrics (--health-address, default 0.0.0.0:8080)
EXPOSE 8080
ENTRYPOINT ["birdwatch", "run"]
