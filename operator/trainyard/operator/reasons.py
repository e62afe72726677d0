"""Condition reasons: one CamelCase word each, the only place they are spelled.

Conditions follow the Kubernetes API conventions; `kubectl describe` shows these
words, dashboards group by them, tests compare against these constants.
"""

from trainyard.api.contract import OOM_REASON

# Valid
SPEC_VALID = "SpecValid"
INVALID_SPEC = "InvalidSpec"

# Running / progress
WAITING_FOR_PODS = "WaitingForPods"
PODS_RUNNING = "PodsRunning"
PROGRESSING = "Progressing"
NO_PROGRESS = "NoProgress"

# Restarts: why the gang was started again
RESTARTING = "Restarting"
PREEMPTED = "Preempted"
EVICTED = "Evicted"
NODE_LOST = "NodeLost"
OOM_KILLED = "OOMKilled"
CUDA_OUT_OF_MEMORY = OOM_REASON  # the word a worker's termination message starts with
NON_ZERO_EXIT = "NonZeroExit"
POD_FAILED = "PodFailed"
JOB_FAILED = "JobFailed"
STALLED = "Stalled"

# Finished
JOB_COMPLETED = "JobCompleted"
RESTART_BUDGET_EXHAUSTED = "RestartBudgetExhausted"
OUT_OF_MEMORY_AT_MINIMUM_BATCH = "OutOfMemoryAtMinimumBatch"
DEADLINE_EXCEEDED = "DeadlineExceeded"

# Spec edits: a running attempt keeps the config it started with
SPEC_APPLIED = "SpecApplied"
SPEC_CHANGE_PENDING = "SpecChangePending"

# Suspend
SUSPENDED_BY_SPEC = "SuspendedBySpec"
RESUMED = "Resumed"

# Clean-up
TTL_EXPIRED = "TTLExpired"

# Pipelines
STAGE_FAILED = "StageFailed"
GATE_REJECTED = "GateRejected"
AWAITING_PERSON = "AwaitingPerson"
NOT_WAITING = "NotWaiting"
ALL_PROMOTED = "AllPromoted"
RETRYING = "Retrying"
RETRY_ACCEPTED = "RetryAccepted"
RETRY_REFUSED = "RetryRefused"
