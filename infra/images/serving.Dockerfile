# Serving image: the llm-auction library with KServe's ModelServer. Runs the InferenceService's transformer
# (`llm-auction serve --transformer`) and the feedback collector (`llm-auction collector`). From the root:
#   docker build -f infra/images/serving.Dockerfile -t ghcr.io/llm-auction/serving:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The transformer runs no model, but the library may import torch: CPU torch keeps the image small.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY infra/requirements/serving.txt /tmp/requirements.txt
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
EXPOSE 8080
ENTRYPOINT ["llm-auction"]
CMD ["serve", "--transformer"]
