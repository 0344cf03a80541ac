# syntax=docker/dockerfile:1
# birdwatch's image: a builder stage makes the wheel, the runtime stage installs only that wheel and runs as UID
# 10001. A rebuild gives the same image: the base image is pinned to a patch release and Debian release, and every
# Python package (the dependencies and the wheel's build backend) is installed at the version constraints.txt pins.
# No Docker engine is needed to check the install steps: hack/check-wheel.sh (make wheel-check) builds the same wheel
# the same way and installs it into a clean virtualenv with the same constraints.
#
#   docker build -t ghcr.io/otomato-gh/birdwatch:0.1.0 .
#   docker run --rm ghcr.io/otomato-gh/birdwatch:0.1.0 --help
#
# For byte-for-byte rebuilds pin the base image by digest as well (docker buildx imagetools inspect <image> shows it):
#   docker build --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest> ...

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- builder: the wheel ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The build context is filtered by .dockerignore: packaging files, constraints.txt and src/ only matter here.
COPY . .
# The build backend at its pinned version, then the wheel without build isolation (which would fetch the newest).
RUN python -m pip install -c constraints.txt setuptools wheel \
 && python -m pip wheel --no-build-isolation --no-deps -w /dist .

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

# The wheel and the constraints are mounted from the builder for this one step, so they never become a layer of the
# image. pip compiles the .pyc files at install time: the container's root filesystem is read-only at run time.
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    --mount=type=bind,from=builder,source=/src/constraints.txt,target=/constraints.txt \
    python -m pip install -c /constraints.txt /dist/*.whl

# A numeric, non-root user: Kubernetes' runAsNonRoot can only verify a numeric UID.
RUN groupadd --system --gid 10001 birdwatch \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin birdwatch
USER 10001:10001
WORKDIR /

# /healthz, /readyz and /metrics (--health-address, default 0.0.0.0:8080)
EXPOSE 8080
ENTRYPOINT ["birdwatch", "run"]
