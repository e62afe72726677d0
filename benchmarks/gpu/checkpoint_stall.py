"""Training stall per checkpoint save on a GPU: transformers' synchronous save vs async snapshots.

A Qwen2.5-1.5B-shaped model (random weights from its config, nothing downloaded) on
the GPU in bf16 with AdamW state after one real training step, saved by
`Trainer._save_checkpoint` as transformers ships it, then by the same call with
`trainyard.workloads.checkpoint_snapshot.AsyncSaves` installed (weights and optimizer
state copied into reused pinned host buffers on a side CUDA stream beside the next
step's forward and backward, written by a forked writer process). Each save is
followed by one real training step (forward, backward, AdamW step); the stall of an
async save is the save call plus the time that step's optimizer waited for the copy,
and the step's own time is printed for both ways. Paired rounds, alternating order;
the writer is drained between rounds so each async save is measured idle, and one more
save per round is measured while the previous one is still being written ("busy").

    python benchmarks/gpu/checkpoint_stall.py --workdir /tmp/ckpt [--rounds 5]
    python benchmarks/gpu/checkpoint_stall.py --tiny     # the code path on CPU

Last line: `stall_vs_sync_save=Y.YY queue_stall_vs_sync_save=Z.ZZ` (median paired
ratios; issue 13's goals: <= 0.25 and <= 0.3).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

# Qwen/Qwen2.5-1.5B config.json (transformers' Qwen2Config names).
QWEN25_15B = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}
TINY = {**QWEN25_15B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


def make_trainer(output_dir: Path, shape: dict, cuda: bool):
    import datasets
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**shape)
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16 if cuda else torch.float32)
    tokens = [list(range(1, 129))] * 8
    data = datasets.Dataset.from_dict({"input_ids": tokens, "labels": tokens})
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=1, per_device_train_batch_size=2,
        report_to=[], save_strategy="no", use_cpu=not cuda, bf16=cuda,
        disable_tqdm=True, save_total_limit=2,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()  # one step: AdamW state exists, as in a checkpoint mid-run
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="toy size, runs on CPU")
    options = parser.parse_args()

    import torch

    from trainyard.workloads.checkpoint_snapshot import AsyncSaves

    cuda = torch.cuda.is_available() and not options.tiny
    work = options.workdir or Path(tempfile.mkdtemp(prefix="ckpt-stall-"))
    shape = TINY if options.tiny else QWEN25_15B
    plain = make_trainer(work / "sync", shape, cuda)
    fast = make_trainer(work / "async", shape, cuda)
    saves = AsyncSaves(fast)
    assert saves.install(), "async saves were refused for this trainer"

    tokens = torch.tensor([list(range(1, 129))] * 2)
    batch = {"input_ids": tokens, "labels": tokens}
    next_step = {"sync": [], "async": []}

    def save(trainer, step: int) -> float:
        trainer.state.global_step = step
        # Start each timed save with the earlier saves' dirty pages on disk: otherwise
        # the kernel's writeback of one save lands in the next one's time.
        os.sync()
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        trainer._save_checkpoint(trainer.model, None)
        if cuda:
            torch.cuda.synchronize()
        held = time.perf_counter() - started
        started = time.perf_counter()
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        if cuda:
            torch.cuda.synchronize()
        took = time.perf_counter() - started
        if trainer is fast:
            blocked = saves.stats[-1].blocked_seconds
            next_step["async"].append(took - blocked)
            return held + blocked
        next_step["sync"].append(took)
        return held

    save(plain, 1)
    save(fast, 1)
    saves.wait()
    sync_s, async_s, busy_s = [], [], []
    step = 1
    for i in range(options.rounds):
        step += 1
        pair = [(plain, sync_s), (fast, async_s)]
        for trainer, into in pair if i % 2 == 0 else reversed(pair):
            into.append(save(trainer, step))
        saves.wait()
        step += 1
        save(fast, step)
        while saves.writing_step != step and step not in saves.written:
            time.sleep(0.001)  # until the writer is on it: the next save meets it busy
        step += 1
        busy_s.append(save(fast, step))
        saves.wait()
    saves.close()
    size = sum(p.stat().st_size for p in (work / "sync" / f"checkpoint-{step - 2}").iterdir())
    if options.workdir is None:
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\nCheckpoint stall per save on {device}: {size / 2**30:.2f} GiB (weights + AdamW)")
    print(f"  {'':40}{'median s':>10}{'vs sync':>10}")
    for label, values in [
        ("synchronous (transformers)", sync_s),
        ("async snapshot, idle", async_s),
        ("async snapshot, previous still writing", busy_s),
    ]:
        print(f"  {label:40}{med(values):>10.3f}{med(values) / med(sync_s):>9.2f}x")
    copies = [s.copy_seconds for s in saves.stats if s.copy_seconds is not None]
    print(
        f"  save call alone (async): median {med(s.snapshot_seconds for s in saves.stats):.3f}s; "
        f"host copy beside the next step: median {med(copies):.3f}s"
    )
    print(
        f"  next training step without its wait: after a sync save {med(next_step['sync']):.3f}s, "
        f"after an async save {med(next_step['async']):.3f}s"
    )
    writes = [s.write_seconds for s in saves.stats if s.write_seconds is not None]
    print(f"  background write per save: median {med(writes):.2f}s; dropped: {saves.skipped}")
    stall = med(a / s for a, s in zip(async_s, sync_s, strict=True))
    busy = med(b / s for b, s in zip(busy_s, sync_s, strict=True))
    print(f"stall_vs_sync_save={stall:.2f} queue_stall_vs_sync_save={busy:.2f}")


if __name__ == "__main__":
    main()
