# The vLLM server for GRPO/RLOO rollouts (server mode) and InferenceServer.
# The operator runs `vllm serve` directly with TRL's flags (operator/trainyard/operator/
# builders/vllm.py), so the image needs vLLM only, not TRL. TRL 1.16 supports vLLM 0.22 to
# 0.31; the operator's default image is vllm/vllm-openai:v0.31.0 itself. This one adds
# the Run:ai model streamer, for models served straight from s3:// (--load-format
# runai_streamer).
FROM vllm/vllm-openai:v0.31.0
ENV PIP_NO_CACHE_DIR=1
RUN pip install "vllm[runai]==0.31.0"
USER 1000:1000
