"""DeepSpeed ZeRO-2 step time of a Qwen2.5-0.5B-shaped model on one GPU.

The SFT benchmark's run (`sft_throughput.py`: full fine-tuning, bf16, every sequence
exactly --seq-len tokens) with `distributed.deepspeed.zeroStage: 2`, so DeepSpeed comes
from the workload's own config builder (`methods.common.deepspeed_config`). One process
(RANK 0 of WORLD_SIZE 1): on one GPU ZeRO-2 shards nothing, so this measures DeepSpeed's
engine overhead against `sft_throughput.py`'s plain step; `--offload-optimizer cpu` moves
the optimizer state to the host (ZeRO-Offload).

    python benchmarks/gpu/zero2_step_time.py
    python benchmarks/gpu/zero2_step_time.py --offload-optimizer cpu
    python benchmarks/gpu/zero2_step_time.py --tiny     # CPU (gloo), seconds
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sft_throughput  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    offload = "none"
    if "--offload-optimizer" in argv:
        index = argv.index("--offload-optimizer")
        offload = argv[index + 1]
        del argv[index : index + 2]
        if offload not in ("none", "cpu"):
            raise SystemExit(f"--offload-optimizer: {offload!r} is not allowed; allowed: none, cpu")
    args = sft_throughput.parse_args(argv)
    deepspeed = {"zeroStage": 2, "offloadOptimizer": offload}
    result = sft_throughput.run(args, deepspeed=deepspeed, title="DeepSpeed ZeRO-2 step time")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
