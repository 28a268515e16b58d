# syntax=docker/dockerfile:1.7
#
# latentd images. Two targets, one build context:
#
#   docker build --target api    -t latentd-api:dev .      # FastAPI front end, no torch
#   docker build --target worker -t latentd-worker:dev .   # diffusers on CUDA, built-in model inside
#
# Python dependencies come only from the hash-locked files in requirements/
# (requirements/lock.sh makes them), so a rebuild next
# month installs the same wheels. The base images are pinned by tag; pass
# *_IMAGE build args with an @sha256 digest to pin them byte for byte.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
# torch 2.13 from PyPI is built against CUDA 13.0 and carries its own CUDA
# libraries as nvidia-* wheels (pinned in requirements/worker.txt). The
# CUDA "base" flavour adds the driver-compat layer and the NVIDIA container
# environment; the heavier "runtime" flavour would duplicate torch's libraries.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

# --- the project itself as a wheel (pure Python, shared by both images) -------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements/build.txt requirements/build.txt
RUN pip install --require-hashes --no-deps -r requirements/build.txt
COPY pyproject.toml README.md ./
COPY latentd latentd
COPY app app
COPY worker worker
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /dist .

# --- api: dependencies in a venv, built apart from the runtime image ----------
FROM ${PYTHON_IMAGE} AS api-venv
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY requirements/api.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install --require-hashes --no-deps -r /tmp/requirements.txt
COPY --from=wheel /dist /tmp/dist
RUN /opt/venv/bin/pip install --no-deps /tmp/dist/*.whl \
    && /opt/venv/bin/python -c "import app.main" \
    && ! /opt/venv/bin/python -c "import torch" 2>/dev/null

# --- api ----------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS api
ARG UID=10001
RUN useradd --system --uid "${UID}" --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin latentd
COPY --from=api-venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LATENTD_HOST=0.0.0.0 \
    LATENTD_PORT=8000
USER ${UID}:${UID}
EXPOSE 8000
# No curl in the slim image; the interpreter is already there.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LATENTD_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["latentd"]
CMD ["api"]

# --- worker: dependencies (torch + CUDA wheels) in a venv ---------------------
FROM ${CUDA_IMAGE} AS worker-venv
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu's archive drops superseded package versions, so exact apt pins would
# break a rebuild; the base image tag (or digest) is what pins the OS.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
COPY requirements/worker.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install --require-hashes --no-deps -r /tmp/requirements.txt
COPY --from=wheel /dist /tmp/dist
# The built-in model ships inside the wheel; refuse to build an image without it.
RUN /opt/venv/bin/pip install --no-deps /tmp/dist/*.whl \
    && /opt/venv/bin/python -c "import pathlib, sys, worker; model = pathlib.Path(worker.__file__).parent / 'builtin' / 'model'; sys.exit(0 if model.is_dir() and any(model.iterdir()) else 'built-in model missing from the wheel: ' + str(model))"

# --- worker -------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS worker
ARG UID=10001
ENV DEBIAN_FRONTEND=noninteractive
# gcc and the Python headers: Triton builds a small C launcher the first time LATENTD_TORCH_COMPILE
# compiles (roughly 200 MB beside several GB of CUDA wheels, not measured; without them the worker
# falls back to eager).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid "${UID}" --user-group --create-home --home-dir /home/latentd \
        --shell /usr/sbin/nologin latentd \
    && mkdir -p /var/cache/latentd/hf \
    && chown -R "${UID}:${UID}" /var/cache/latentd
COPY --from=worker-venv /opt/venv /opt/venv
# The hub cache lives on a volume so a container restart does not download a
# checkpoint again, and so do torch.compile's caches (LATENTD_TORCH_COMPILE:
# a restart finds its kernels instead of compiling for minutes; by default
# they would fill /tmp). LATENTD_READY_FILE appears once the model is loaded.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/var/cache/latentd/hf \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/latentd/inductor \
    TRITON_CACHE_DIR=/var/cache/latentd/triton \
    LATENTD_CACHE_DIR=/var/cache/latentd \
    LATENTD_READY_FILE=/tmp/latentd-worker.ready
VOLUME ["/var/cache/latentd"]
USER ${UID}:${UID}
# Loading a hub checkpoint on first start can take minutes: the start period
# covers it, and the check only turns healthy once the model is in memory.
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s --retries=3 \
    CMD ["sh", "-c", "test -f \"$LATENTD_READY_FILE\""]
# SIGTERM lets the current job finish; give `docker stop` a long timeout (-t).
STOPSIGNAL SIGTERM
ENTRYPOINT ["latentd"]
CMD ["worker"]
