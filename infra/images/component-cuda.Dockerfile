# Component image, CUDA: the component image plus the `gpu` extra (vLLM generation, DeepSpeed DPO), for the
# GPU steps and the DPO TrainJob. From the repository root:
#   docker build -f infra/images/component-cuda.Dockerfile -t ghcr.io/llm-auction/component-cuda:0.1.0 .
# Ubuntu 24.04 because it ships Python 3.12 (the project needs >= 3.11; 22.04 has 3.10). Only the driver
# comes from the host: torch's CUDA libraries arrive as wheels, pinned by vLLM.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY infra/requirements/component.txt /tmp/requirements.txt
COPY pyproject.toml README.md /src/
COPY src /src/src
# vLLM pins the CUDA torch it was built against, so torch comes with the `gpu` extra, not before it.
RUN pip install -r /tmp/requirements.txt "/src[gpu]"

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# The base image's `ubuntu` user holds uid 1000; the pods run as 1000, so it becomes `app`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 LLM_AUCTION_PROFILE=cluster DS_BUILD_OPS=0
WORKDIR /home/app
USER 1000:1000
