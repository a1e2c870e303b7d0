"""One rank of the distributed engine test (tests/test_distributed.py): DeepSpeed ZeRO on CPU
with gloo, a tiny Llama built from a config and the same seed on every rank, the REFUEL loss
(``refuel_agents.losses.refuel_loss``) on summed response log-probs
(``refuel_agents.logprobs.sequence_logprobs``), and a JSON report per rank.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/dist_worker.py \\
        --out /tmp/dist-report --stages 3 2

    torchrun --nproc_per_node 2 tests/dist_worker.py --keep 3 0 --config '{"output_dir": ...}'

With ``--keep``, each rank runs REBEL (``refuel_agents.baselines``) from the config's fields instead,
keeping only the first k_r of the rows that rank r collects (:class:`KeepingTrainer`), so that the
ranks train on uneven shards, and trains it.

Stage 3 runs two optimizer steps of two micro-batches each with all parameters trained, saves
after the first step and resumes a fresh engine from that checkpoint to redo the second.
Stage 2 trains only the last decoder layer (plus final norm and lm_head) with gradient
checkpointing. Each rank feeds its own data, so the update is a real data-parallel average.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import deepspeed
import torch
from torchrun_worker import exit_now, report_and_exit  # (run as a script: tests/ is on sys.path)
from transformers import LlamaConfig, LlamaForCausalLM

from refuel_agents.baselines import RebelTrainer, make_config
from refuel_agents.engine import OptimConfig, TrainEngine
from refuel_agents.logprobs import sequence_logprobs
from refuel_agents.losses import refuel_loss

CONFIGS = Path(__file__).resolve().parent.parent / "refuel_agents" / "configs"
OPTIM = OptimConfig(lr=1e-3, warmup_ratio=0.0, max_grad_norm=1.0, grad_accum_steps=2)
TOTAL_STEPS = 4
MICRO_BATCH = 2  # pairs per micro-batch
ETA = 1.0


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def pair_batch(rank: int, micro_step: int) -> dict[str, dict[str, torch.Tensor] | torch.Tensor]:
    """Two responses y, y' to the same prompt per row, as collated batches, and their rewards;
    different on every rank."""
    g = torch.Generator().manual_seed(1000 * rank + micro_step)
    prompt = torch.randint(0, 96, (MICRO_BATCH, 6), generator=g)
    response_mask = torch.cat([torch.zeros(MICRO_BATCH, 6), torch.ones(MICRO_BATCH, 5)], dim=1).long()

    def responses() -> dict[str, torch.Tensor]:
        ids = torch.cat([prompt, torch.randint(0, 96, (MICRO_BATCH, 5), generator=g)], dim=1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": response_mask}

    return {"y": responses(), "y2": responses(), "reward_y": torch.randn(MICRO_BATCH, generator=g),
            "reward_y2": torch.randn(MICRO_BATCH, generator=g)}


def on_device(batch: dict, device: torch.device) -> dict:
    return {k: on_device(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()}


def reference_logprobs(engine: TrainEngine, batches: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """pi_t's log-probs of both responses, computed once before the updates."""
    with torch.no_grad():
        return [(sequence_logprobs(engine.model, b["y"]), sequence_logprobs(engine.model, b["y2"])) for b in batches]


def train_steps(engine: TrainEngine, batches: list[dict], refs: list, micro_steps: range) -> list[dict]:
    stats = []
    for i in micro_steps:
        b, (ref, ref2) = batches[i], refs[i]
        loss = refuel_loss(sequence_logprobs(engine.model, b["y"]), ref, sequence_logprobs(engine.model, b["y2"]), ref2,
                           b["reward_y"], b["reward_y2"], eta=ETA)
        engine.backward(loss)
        info = engine.step()
        if info is not None:
            stats.append({**info, "loss": engine.all_reduce_mean(loss.item())})
    return stats


def gathered(engine: TrainEngine) -> dict[str, torch.Tensor]:
    """Full copies of every parameter (gathered from the shards under ZeRO-3)."""
    params = dict(engine.unwrapped.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None,
                                           enabled=engine.zero_stage == 3):
        return {name: p.detach().float().cpu() for name, p in params.items()}


def digest(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {name: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for name, t in tensors.items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: (a[name] - b[name]).abs().max().item() for name in a}


def run_zero3(rank: int, out: Path) -> dict:
    config = CONFIGS / "deepspeed_zero3.json"
    model = tiny_llama()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = TrainEngine(model, OPTIM, TOTAL_STEPS, deepspeed_config=config, micro_batch_size=MICRO_BATCH)
    batches = [on_device(pair_batch(rank, i), engine.device) for i in range(4)]
    shards = {n: {"full": int(p.ds_numel), "local": int(p.ds_tensor.numel())}
              for n, p in engine.unwrapped.named_parameters()}
    refs = reference_logprobs(engine, batches)
    stats = train_steps(engine, batches, refs, range(0, 2))
    engine.save(out / "zero3-checkpoint")
    stats += train_steps(engine, batches, refs, range(2, 4))
    final = gathered(engine)
    unwrapped = engine.unwrapped_model_state()

    resumed_engine = TrainEngine(tiny_llama(), OPTIM, TOTAL_STEPS, deepspeed_config=config, micro_batch_size=MICRO_BATCH)
    resumed_engine.load(out / "zero3-checkpoint")
    resumed_steps = resumed_engine.optimizer_steps
    resumed_stats = train_steps(resumed_engine, batches, refs, range(2, 4))
    resumed = gathered(resumed_engine)
    return {
        "world_size": engine.world_size,
        "zero_stage": engine.zero_stage,
        "shards": shards,
        "init_digest": digest(init),
        "final_digest": digest(final),
        "change_from_init": max_diff(final, init),
        "stats": stats,
        "optimizer_steps": engine.optimizer_steps,
        "resumed_optimizer_steps_after_load": resumed_steps,
        "resumed_stats": resumed_stats,
        "resumed_vs_uninterrupted": max_diff(resumed, final),
        "unwrapped_vs_gathered": None if unwrapped is None else max_diff(
            {n: unwrapped[n].float() for n in final}, final),
        "bf16": engine.bf16,
        "rank_mean": engine.all_reduce_mean(float(rank)),
    }


def run_zero2(rank: int) -> dict:
    model = tiny_llama()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = TrainEngine(model, OPTIM, TOTAL_STEPS, deepspeed_config=CONFIGS / "deepspeed_zero2.json",
                         micro_batch_size=MICRO_BATCH, last_k_layers=1, gradient_checkpointing=True)
    batches = [on_device(pair_batch(rank, i), engine.device) for i in range(2)]
    trainable = [n for n, p in engine.unwrapped.named_parameters() if p.requires_grad]
    stats = train_steps(engine, batches, reference_logprobs(engine, batches), range(2))
    final = gathered(engine)
    partitions = engine.model.optimizer.single_partition_of_fp32_groups
    return {
        "zero_stage": engine.zero_stage,
        "trainable": trainable,
        "trainable_numel": sum(p.numel() for p in engine.unwrapped.parameters() if p.requires_grad),
        "optimizer_partition_numel": sum(p.numel() for p in partitions),
        "final_digest": digest(final),
        "change_from_init": max_diff(final, init),
        "stats": stats,
    }


class KeepingTrainer(RebelTrainer):
    """REBEL that keeps only the first ``keep[rank]`` rows each rank collects: uneven kept counts on purpose."""

    keep: tuple[int, ...] = ()

    def collect(self, iteration: int):
        rows, stats = super().collect(iteration)
        return rows[: self.keep[self.rank]], stats


def keeping_trainer(keep: list[int], **fields) -> KeepingTrainer:
    trainer = type("Keeping", (KeepingTrainer,), {"keep": tuple(keep)})
    return trainer(make_config("rebel", "lt-offline", **fields))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for rank<r>.json and checkpoints")
    parser.add_argument("--stages", type=int, nargs="+", default=[3, 2], choices=[2, 3], help="ZeRO stages to run")
    parser.add_argument("--keep", type=int, nargs="+", help="rows each rank keeps: train REBEL on uneven shards")
    parser.add_argument("--config", type=json.loads, default={}, help="REBEL's config fields, as JSON (with --keep)")
    args = parser.parse_args()
    if args.keep:
        keeping_trainer(args.keep, **args.config).train()
        exit_now()
    rank = int(os.environ["RANK"])
    report: dict = {}
    for stage in args.stages:
        report[f"zero{stage}"] = run_zero3(rank, args.out) if stage == 3 else run_zero2(rank)
    report_and_exit(args.out, rank, report)


if __name__ == "__main__":
    main()
