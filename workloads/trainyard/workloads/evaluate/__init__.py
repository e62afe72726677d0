"""The evaluation workload: what a promotion gate judges.

`python -m trainyard.workloads.evaluate TASK.json` (the gate's evaluation Job) and
`trainyard evaluate MODEL --suite … --dataset …` (this machine) compute eval_loss and
perplexity, accuracy, refusal and over-refusal rates, rewards with the run's own reward
spec, and user metrics, and write eval.json (last), per-example records and a report
beside the checkpoint. See `runner` for the files, `suites` for the metrics.
"""
