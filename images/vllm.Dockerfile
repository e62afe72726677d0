# The vLLM rollout server for GRPO (server mode) and InferenceServer: vLLM's own image
# plus TRL, whose weight-sync endpoints the trainer talks to.
FROM vllm/vllm-openai:v0.11.0
ENV PIP_NO_CACHE_DIR=1
RUN pip install "trl==1.16.0"
USER 1000:1000
