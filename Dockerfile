# The environment for train_gpt.py and train_cifar.py on a GPU node. The repository is mounted at
# /workspace rather than copied in, so editing the code needs no rebuild:
#
#   docker build -t speedrun .
#   docker run --gpus all --ipc=host -v "$PWD":/workspace speedrun ./run.sh
#
# CUDA 13.0.3 is the CUDA of the torch==2.13.0 wheels on PyPI, which bring their own CUDA runtime,
# cuDNN and NCCL; the devel image adds nvcc and the headers for building extensions.
FROM nvidia/cuda:13.0.3-devel-ubuntu24.04

# uv installs an exact CPython build, then the requirements into a virtual environment.
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /usr/local/bin/uv

# 3.11, the minor version CI runs the tests on; torch 2.13.0 has wheels for CPython 3.10 to 3.14.
ARG PYTHON_VERSION=3.11.18
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_COMPILE_BYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1

# Triton compiles a small C launcher for every kernel it builds, at run time.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN uv venv --python "$PYTHON_VERSION" /opt/venv

COPY requirements.txt /tmp/requirements.txt
# torch first, as pinned, so that no other requirement can pull in another build.
RUN uv pip install "$(grep '^torch==' /tmp/requirements.txt)" \
    && uv pip install -r /tmp/requirements.txt

WORKDIR /workspace
CMD ["./run.sh"]
