# syntax=docker/dockerfile:1
# The rayrec image the k8s/ manifests run (KubeRay head, workers, RayJob submitter, RayService).
#   docker build -t rayrec:cpu .                          # CPU: torch CPU wheel + fbgemm-gpu-cpu
#   docker build --build-arg VARIANT=cuda -t rayrec:cuda .   # CUDA: PyPI torch + fbgemm-gpu
# Installs exactly what `make install` installs, in the same order and under constraints.txt:
# torch==2.13.0, fbgemm 1.8.0 (CPU or CUDA build), torchrec==1.8.0 --no-deps plus its own needs,
# then rayrec itself (`pip install -e .`) and its MPZCH kernel (built here, where g++ is).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    RAYREC_EXTENSION_DIR=/opt/rayrec/extensions
# Debian's point releases replace package versions, so pins would break rebuilds (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
# The CPU image takes torch from PyTorch's CPU index: the PyPI wheel for Linux is the CUDA build,
# several GB the CPU image does not need. fbgemm and torch versions must match exactly.
RUN python -m venv "$VIRTUAL_ENV" \
    && if [ "$VARIANT" = "cuda" ]; then \
         TORCH_INDEX=""; FBGEMM="fbgemm-gpu==1.8.0"; \
       else \
         TORCH_INDEX="https://download.pytorch.org/whl/cpu"; FBGEMM="fbgemm-gpu-cpu==1.8.0"; \
       fi \
    && pip install -c constraints.txt ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch==2.13.0 \
    && pip install -c constraints.txt "$FBGEMM" \
    && pip install -c constraints.txt --no-deps torchrec==1.8.0 \
    && pip install -c constraints.txt tensordict torchmetrics==1.0.3 tqdm pyre-extensions iopath
COPY . .
RUN pip install -c constraints.txt -e '.[k8s]' \
    && python -m embeddings.csrc.build

FROM ${PYTHON_IMAGE}
# NUMBA_CACHE_DIR: numba keeps the MFLI lookup's machine code beside its source by default, and
# /opt/rayrec is not the ray user's to write; the first lookup in a container compiles (~10 s).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RAYREC_EXTENSION_DIR=/opt/rayrec/extensions \
    NUMBA_CACHE_DIR=/home/ray/.cache/numba \
    HOME=/home/ray
# KubeRay's probes and submitter use bash and wget.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends bash wget ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 ray \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/ray ray
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/rayrec /opt/rayrec
COPY --from=build --chown=1000:1000 /app /app
WORKDIR /app
# The manifests run pods with runAsNonRoot/runAsUser 1000: the image's user matches.
USER 1000:1000
CMD ["rayrec", "--help"]
