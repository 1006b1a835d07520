# Component image, CPU: the llm-auction library with kfp. It is the base_image of every KFP component and
# also runs the MLflow server and the Feast feature server. From the repository root:
#   docker build -f infra/images/component.Dockerfile -t ghcr.io/llm-auction/component:0.1.0 .
# No build secrets: everything comes from public package indexes.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CPU torch first, from PyTorch's CPU index: a bare `torch` requirement would pull a CUDA build from PyPI.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY infra/requirements/component.txt /tmp/requirements.txt
COPY pyproject.toml README.md /src/
COPY src /src/src
RUN pip install -r /tmp/requirements.txt /src

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 LLM_AUCTION_PROFILE=cluster
WORKDIR /home/app
USER 1000:1000
