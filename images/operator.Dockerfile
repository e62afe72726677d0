# The operator: kopf + the API models. No torch, no CUDA: a small image.
# Build from the repository root: docker build -f images/operator.Dockerfile -t trainyard-operator .
FROM python:3.11.14-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY images/operator.constraints.txt ./constraints.txt
COPY operator ./operator
COPY workloads ./workloads
COPY crds ./crds
# Every direct dependency at the exact version the tests ran with (constraints.txt).
RUN pip install --constraint constraints.txt ".[operator]" && rm -rf /src
# A numeric non-root user, so runAsNonRoot can be verified by the kubelet.
USER 65532:65532
WORKDIR /
ENTRYPOINT ["trainyard", "operator"]
