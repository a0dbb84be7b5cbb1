# syntax=docker/dockerfile:1
# GPU image of grpo-gsm8k: CUDA 13.0, Ubuntu 24.04, CPython 3.12, exactly requirements.lock.
#
#   docker build -t grpo-gsm8k .
#   docker run --rm --gpus all --ipc=host --user "$(id -u):$(id -g)" -e HF_TOKEN \
#       -v "$PWD":/app -v ~/.cache/huggingface:/cache/huggingface grpo-gsm8k make all
# (run from the checkout: the results land in it; README.md "Docker" for the other ways)
#
# Host: an NVIDIA GPU, NVIDIA driver >= 580 (torch 2.11's PyPI wheels are CUDA 13 builds) and the
# NVIDIA Container Toolkit (for --gpus). docker/entrypoint.sh checks the driver and says what is wrong.
# HF_TOKEN is given at run time only (-e HF_TOKEN): never as ARG/ENV, so it is in no image layer.
#
# Base image pinned by tag and digest (the multi-arch manifest list of the tag). To move to another
# tag, read its digest with:  docker buildx imagetools inspect nvidia/cuda:<tag>   ("Digest:" line)
# devel rather than runtime: Triton, FlashInfer (vLLM) and DeepSpeed compile kernels at run time and
# need nvcc, the CUDA headers and a C compiler.
FROM nvidia/cuda:13.0.1-devel-ubuntu24.04@sha256:7d2f6a8c2071d911524f95061a0db363e24d27aa51ec831fcccf9e76eb72bc92

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# NVIDIA_DISABLE_REQUIRE: the base image asks the container toolkit to refuse drivers older than
# CUDA 13 with a terse "unsatisfied condition: cuda>=13.0"; docker/entrypoint.sh does the same check
# itself (driver >= 580) and prints what to do instead.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    NVIDIA_DISABLE_REQUIRE=1

# Ubuntu 24.04's own python3.12; git for DVC/dvclive, make for `make all`, a C toolchain for Triton.
# The base image is pinned by digest; apt versions are not pinned because the Ubuntu archive drops
# superseded versions, which would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        python3.12 python3.12-venv python3.12-dev \
        build-essential git make ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.12 -m venv /opt/venv

# Exactly the lock: every file hash-checked, no resolver (the lock is already the full closure).
COPY requirements.lock /tmp/requirements.lock
RUN pip install --require-hashes --no-deps -r /tmp/requirements.lock \
 && rm /tmp/requirements.lock

# Non-root user. Ubuntu 24.04 images already have "ubuntu" with uid 1000: replace it with "app"
# (same uid by default, so files written to bind mounts belong to the usual first host user).
ARG APP_UID=1000
ARG APP_GID=1000
RUN userdel --remove ubuntu 2>/dev/null || true \
 && groupadd --gid "${APP_GID}" app \
 && useradd --create-home --uid "${APP_UID}" --gid "${APP_GID}" --shell /bin/bash app \
 && mkdir -p /app /cache/huggingface \
 && chown app:app /app /cache/huggingface

# The project: the package into the venv (its dependencies are all in the lock), the rest in /app.
COPY --chown=app:app . /app
RUN pip install --no-deps /app \
 && rm -rf /app/build /app/*.egg-info

COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/entrypoint.sh

# Numeric, so the runtime needs no /etc/passwd lookup (and it is visibly not root).
USER ${APP_UID}:${APP_GID}
WORKDIR /app
# Model weights and the GSM8K download survive the container: mount a named volume or a host folder.
VOLUME ["/cache/huggingface"]

ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
CMD ["make", "all"]
