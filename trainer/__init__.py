"""Headless Joint-GRPO trainer for VANS (stage 1: VLM policy; stage 2: video model policy).

Modules:

* ``config``     dataclass configs, YAML files, ``--set key=value`` overrides, ``--help`` text from field docs.
* ``data``       the VANS CSV / JSONL datasets (unreadable rows reported and skipped) and ``FeatureCache``,
                 a content-keyed on-disk cache for per-sample work that never changes during training.
* ``checkpoint`` atomic training checkpoints (trainable weights, optimizer, schedule, RNG, data position).
* ``metrics``    per-step JSONL metrics, TensorBoard when installed, PNG reward curves, peak memory.
* ``runner``     the loop shared by both stages: single process or ``accelerate launch`` data parallel,
                 sharding, gradient all-reduce, optimizer/schedule/clipping, checkpoints, exact resume,
                 non-finite and out-of-memory handling, progress and metrics.
* ``grpo``       the token-level GRPO loss (PPO clip + k3 KL) of stage 1.
* ``stage1``     stage 1 entry point: ``python -m trainer.stage1 --config FILE [--set k=v ...] [--resume]``.
* ``flow_grpo``, ``dit_lora``, ``stage2``  stage 2 (Flow-GRPO on the Wan DiT).

Config files live in ``trainer/configs``.
"""
