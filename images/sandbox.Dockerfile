# The sandbox service (`trainyard sandbox`): runs code-execution rewards' programs for
# trainers that keep the restricted Pod Security Standard. Python and Trainyard's core
# only (no torch, no CUDA). Stages that compile need their toolchain: build FROM this
# image, install it (gcc, ocaml, opam…), and name your image with `trainyard sandbox --image`.
# Build from the repository root: docker build -f images/sandbox.Dockerfile -t trainyard-sandbox .
FROM python:3.11.14-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY images/operator.constraints.txt ./constraints.txt
COPY operator ./operator
COPY workloads ./workloads
COPY crds ./crds
# The core's dependencies at the operator image's versions (constraints.txt).
RUN pip install --constraint constraints.txt "." && rm -rf /src
# Numeric and non-root, as the images' rule is; the jail's pod runs it as root of its own
# user namespace (runAsUser 0, hostUsers: false), the gVisor variant as this user.
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["python", "-m", "trainyard.workloads.rewards.sandbox_server"]
