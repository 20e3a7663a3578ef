# syntax=docker/dockerfile:1
# The OpenAI-compatible proxy (proxy/, `python -m proxy`). Build from the repository root:
#   docker build -f docker/proxy.Dockerfile -t qwen-vl-proxy .
# Settings come from the environment (PROXY_*, TRITON_GRPC_URL, TRITON_MODEL,
# SERVED_MODEL_NAME, ...; `python -m proxy --help` lists them with their variables).
ARG PYTHON_TAG=3.12-slim
FROM python:${PYTHON_TAG}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Every pin in requirements/proxy.txt has a manylinux wheel: no compiler in the image.
COPY requirements/proxy.txt /tmp/requirements/proxy.txt
RUN pip install --no-cache-dir -r /tmp/requirements/proxy.txt \
    && rm -rf /tmp/requirements \
    && groupadd --system --gid 10001 proxy \
    && useradd --system --uid 10001 --gid proxy --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin proxy \
    && mkdir -p /var/lib/qwen-vl-proxy \
    && chown proxy:proxy /var/lib/qwen-vl-proxy

WORKDIR /app
# Root-owned and read-only to the proxy user; the container can run with a read-only root fs.
COPY proxy/ /app/proxy/

USER 10001:10001
# Stored files, responses and batches: the SQLite database lives here unless PROXY_DATABASE_URL
# names a PostgreSQL (docs/state.md). Mount a volume on it; a named volume takes its owner.
ENV PROXY_HOST=0.0.0.0 \
    PROXY_PORT=9000 \
    PROXY_STATE_DIR=/var/lib/qwen-vl-proxy
EXPOSE 9000

# /health: the process serves HTTP (readiness of the model is /ready).
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PROXY_PORT', '9000'), timeout=4)"]

CMD ["python", "-m", "proxy"]
