# syntax=docker/dockerfile:1
# Qwen2.5-VL on a stock NVIDIA Triton image: model_repository/ baked in at /models, served by
# tritonserver on its standard ports. Build from the repository root:
#   docker build -f docker/model.Dockerfile -t qwen-vl-triton .
#
# Base: Triton 26.01 (v2.65.0), Ubuntu 24.04 with Python 3.12 (every -py3 image since 24.12
# ships Python 3.12; 26.01 is CUDA 13.1). The Python backend runs the model under that system
# python3, so requirements/model.txt is installed into it and must have cp312 wheels.
ARG TRITON_TAG=26.01-py3
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}

# The Python the base image ships; checked at build time below. Change it with TRITON_TAG.
ARG PYTHON_VERSION=3.12

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The Triton image sets PIP_BREAK_SYSTEM_PACKAGES=1 itself (Ubuntu 24.04's python3 is PEP 668
# "externally managed"); it is repeated here so the install below does not depend on it.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# requirements/model.txt pins (see that file):
# - torch/torchvision: a matching pair from PyPI, whose Linux wheels are CUDA builds (torch
#   2.14.1 bundles CUDA 13.0 libraries: host driver R580 or newer); no CUDA toolkit is needed.
# - numpy==1.26.4: Triton's Python backend corrupted TYPE_STRING tensors under numpy 2.x in the
#   releases this project was verified on (2.51); the base image itself installs numpy<2.
# --ignore-installed: pip must not try to uninstall the Debian-packaged python3-* modules of the
#   base image (setuptools is one that torch needs newer); the new ones go to /usr/local.
COPY requirements/model.txt /tmp/requirements/model.txt
RUN python3 -c "import sys; v = '%d.%d' % sys.version_info[:2]; \
sys.exit(0 if v == '${PYTHON_VERSION}' else 'this image has Python ' + v + ', requirements are pinned for ${PYTHON_VERSION}')" \
    && python3 -m pip install --no-cache-dir --ignore-installed -r /tmp/requirements/model.txt \
    && python3 -c "import numpy, torch, torchvision, transformers, qwen_vl_utils, llguidance; \
assert numpy.__version__.startswith('1.'), numpy.__version__; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" \
    && rm -rf /tmp/requirements

# HF_HOME: mount a volume here to keep downloaded weights across containers (docker/compose.yaml
# does). It is the only directory the server user needs to write, with its home directory.
ENV HF_HOME=/cache/huggingface
RUN install -d -o triton-server -g triton-server /cache /cache/huggingface \
    && install -d -o triton-server -g triton-server "$(getent passwd triton-server | cut -d: -f6)"

# The model repository, owned by root and read-only to the server user. Triton needs no write
# access to it; TRITON_INSTANCE_COUNT / TRITON_INSTANCE_KIND make triton_launch.py render a
# copy under /tmp instead of editing it.
COPY model_repository/ /models/
COPY docker/triton_launch.py docker/fetch_weights.py docker/model_probe.py /opt/qwen-vl/

# 1000 is triton-server, the non-root user that the Triton image creates for this (numeric, so
# Kubernetes runAsNonRoot can verify it).
USER 1000:1000
WORKDIR /opt/tritonserver

# 8000 HTTP (health, /v2 API, /generate_stream), 8001 gRPC (the proxy, perf_analyzer), 8002 metrics.
EXPOSE 8000 8001 8002

# Ready means the weights are loaded. A first start downloads and loads ~16 GB: long start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30m --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8000/v2/health/ready"]

# The image's ENTRYPOINT (/opt/nvidia/nvidia_entrypoint.sh) is kept: it execs this command.
# triton_launch.py execs tritonserver (unchanged unless TRITON_INSTANCE_* is set), so
# tritonserver gets SIGTERM on `docker stop` and drains for up to --exit-timeout-secs.
CMD ["python3", "/opt/qwen-vl/triton_launch.py", "tritonserver", "--model-repository=/models", "--exit-timeout-secs=30"]
