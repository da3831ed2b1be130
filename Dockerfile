# syntax=docker/dockerfile:1
#
# budgeter container image: one image for every process.
#
#   docker build -t budgeter:local .
#
# The default command serves the HTTP API (Message Batches, the /v1/messages proxy, admin,
# /healthz, /readyz, /metrics) on 8080:
#
#   docker run -p 8080:8080 -e BUDGETER_REDIS_URL=redis://redis:6379/0 budgeter:local
#
# Workers use the same image and override the command (ENTRYPOINT is `budgeter`, so only
# the arguments are given); their /metrics, /healthz and /readyz listen on 9108:
#
#   docker run budgeter:local worker --host 0.0.0.0 --metrics-port 9108
#
# A worker container must also override the HEALTHCHECK below (it probes the API port):
# deploy/docker-compose.yml and deploy/k8s/ do so against http://127.0.0.1:9108/healthz.
# Configuration is the BUDGETER_* environment (README.md, "Configuration"); secrets
# (BUDGETER_UPSTREAM_API_KEY, BUDGETER_ADMIN_TOKEN) are given at run time, never baked in.

# ---- builder: wheels of budgeter and of every dependency --------------------------------
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# compilers only for a dependency without a wheel for this platform; they stay here
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY budgeter ./budgeter
RUN pip wheel --wheel-dir /wheels .

# ---- runtime: the installed wheels, no build tools, a non-root user ------------------------
FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="budgeter" \
      org.opencontainers.image.description="Token budgets and fair admission in front of an Anthropic-compatible Messages API" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 budgeter \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/budgeter --create-home \
       --shell /usr/sbin/nologin budgeter

# the wheels are bind-mounted from the builder, so they never become a layer of this image
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels budgeter

WORKDIR /home/budgeter
USER 10001:10001

# 8080: `budgeter api`; 9108: `budgeter worker --metrics-port 9108`
EXPOSE 8080 9108

HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

# SIGTERM (docker stop, Kubernetes) stops the API cleanly and drains a worker for
# BUDGETER_DRAIN_SECONDS: give containers a longer stop timeout than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["budgeter"]
CMD ["api", "--host", "0.0.0.0", "--port", "8080"]
