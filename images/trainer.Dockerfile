# Training pods: torch (CUDA), TRL, PEFT, DeepSpeed, boto3, prometheus-client.
# Build from the repository root: docker build -f images/trainer.Dockerfile -t trainyard-trainer .
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface TRITON_CACHE_DIR=/cache/triton TRAINYARD_CACHE=/cache/trainyard
WORKDIR /src
COPY pyproject.toml README.md ./
COPY images/trainer.constraints.txt ./constraints.txt
COPY operator ./operator
COPY workloads ./workloads
COPY crds ./crds
# Every direct dependency at the exact version the tests ran with (constraints.txt); torch
# is the base image's. DeepSpeed compiles its ops against that torch, so no build isolation.
RUN pip install --constraint constraints.txt ".[train]" bitsandbytes \
 && pip install --constraint constraints.txt --no-build-isolation deepspeed \
 && rm -rf /src
RUN useradd --uid 1000 --create-home trainer && mkdir -p /cache && chown 1000:1000 /cache
USER 1000:1000
WORKDIR /home/trainer
ENTRYPOINT ["python", "-m", "trainyard.workloads.train"]
