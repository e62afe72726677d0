"""GRPO/RLOO rewards: pure functions in TRL's signature `(completions, **columns) -> list[float]`.

The training code calls `build_reward_functions(run.spec.rewards, strip_thinking=...)` and
hands the functions and weights to TRL (`reward_funcs=`, `reward_weights=`); code that is
not TRL calls `combined_reward` or `score_rewards` with the same functions.
"""

from trainyard.workloads.rewards.code_execution import code_execution_reward, extract_code
from trainyard.workloads.rewards.combine import (
    BUILTIN_REWARDS,
    NamedReward,
    bind_reward,
    build_reward_functions,
    combined_reward,
    load_python_reward,
    score_rewards,
)
from trainyard.workloads.rewards.format import clause_presence_reward, length_reward, regex_reward
from trainyard.workloads.rewards.penalties import extraneous_content_penalty, redundancy_penalty
from trainyard.workloads.rewards.sandbox import (
    Sandbox,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    require_isolation,
)
from trainyard.workloads.rewards.similarity import count_match_reward, reference_similarity_reward
from trainyard.workloads.rewards.thinking import strip_thinking, strip_thinking_from_completion

__all__ = [
    "BUILTIN_REWARDS",
    "NamedReward",
    "Sandbox",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailable",
    "bind_reward",
    "build_reward_functions",
    "clause_presence_reward",
    "code_execution_reward",
    "combined_reward",
    "count_match_reward",
    "extract_code",
    "extraneous_content_penalty",
    "length_reward",
    "load_python_reward",
    "redundancy_penalty",
    "reference_similarity_reward",
    "regex_reward",
    "require_isolation",
    "score_rewards",
    "strip_thinking",
    "strip_thinking_from_completion",
]
