# A runnable image of bert-pretrain on the official CUDA PyTorch image.
#
#   docker build -t bert-pretrain .                       # smoke test: bert-train --help
#   docker run --gpus all --rm bert-pretrain              # prints bert-train --help
#   docker run --gpus all --rm -v "$PWD/prep:/data" bert-pretrain \
#       bert-train --config configs/base.yaml data.path=/data/data
#
# Clusters without Docker (ABCI runs Singularity): push the image to a registry and convert it,
#   singularity build bert.sif docker://<registry>/bert-pretrain:<tag>
# or build launch/templates/apptainer.def directly; then `bert-launch ... --image bert.sif`.
#
# The base image's torch is kept: the project is installed under a constraints file that pins
# it, so no dependency can replace it. BASE_IMAGE may be any CUDA PyTorch >= 2.4 image
# (NGC: nvcr.io/nvidia/pytorch:<yy.mm>-py3). The default is a CUDA 12.6 build: it still has
# V100 (sm_70) kernels besides sm_80/sm_90, which CUDA 12.8 builds of torch >= 2.11 and all
# CUDA 13 builds dropped; torch 2.14 is the last release with CUDA 12.6 wheels (see README,
# "Installing on a V100 cluster"). Blackwell GPUs need a CUDA 12.8+ image instead.
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG EXTRAS=hf,ja,tensorboard,triton
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/bert-pretrain

COPY setup.py pyproject.toml constraints.txt README.md ./
COPY pretrain/ pretrain/
COPY launch/ launch/
COPY kernels/ kernels/
COPY data_prep/ data_prep/
COPY configs/ configs/

RUN { python -m pip freeze | grep -i '^torch==' || true; } > /tmp/torch-pin.txt \
    && python -m pip install --no-cache-dir -c /tmp/torch-pin.txt ".[${EXTRAS}]" \
    && rm /tmp/torch-pin.txt \
    && bert-train --help > /dev/null \
    && bert-launch --help > /dev/null \
    && python -c "import torch; print('CUDA archs:', torch.cuda.get_arch_list())"

CMD ["bert-train", "--help"]
