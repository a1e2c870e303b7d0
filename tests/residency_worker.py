"""One rank of the ledger test (tests/test_residency_ledger.py): two REFUEL iterations under DeepSpeed
ZeRO-3 on gloo ranks (the second collects with AdamW's state in place, as every later one does), a
tiny policy and a tiny Llama reward model built from configs, and the bytes each phase held on this
rank (``trainer.residency.resident``, each phase's peak) next to the memory ledger's.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/residency_worker.py \\
        --policy PATH --reward PATH --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torchrun_worker import report_and_exit  # (run as a script: tests/ is on sys.path)

from refuel_agents.memory_ledger import ModelShape, plan_for
from refuel_agents.refuel import RefuelConfig, RefuelTrainer

CONFIGS = Path(__file__).resolve().parent.parent / "refuel_agents" / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="policy checkpoint folder")
    parser.add_argument("--reward", required=True, help="reward model checkpoint folder (sequence classification)")
    parser.add_argument("--out", type=Path, required=True, help="folder for rank<r>.json and the run")
    args = parser.parse_args()
    config = RefuelConfig(
        policy_model=args.policy, env_kwargs={"user": "instant", "max_turns": 2, "tokenizer": None, "reward_model": args.reward},
        iterations=2, prompts_per_iteration=2, batch_size=2, micro_batch_size=1, max_new_tokens=4, eval_prompts=2,
        reference_kl=True, deepspeed=str(CONFIGS / "deepspeed_zero3.json"), output_dir=str(args.out), run_name="ledger",
        progress=False,
    )  # fmt: skip
    trainer = RefuelTrainer(config)
    trainer.train()
    plan = plan_for(config, world=trainer.world, policy=ModelShape.from_config(args.policy),
                    reward=ModelShape.from_config(args.reward), gpu_memory_gb=80, device="cpu")
    report = {"rank": trainer.rank, "world": trainer.world, "zero_stage": trainer.engine.zero_stage,
              "resident": trainer.residency.resident, "ledger": plan.phases}
    report_and_exit(args.out, trainer.rank, report)


if __name__ == "__main__":
    main()
