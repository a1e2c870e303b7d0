"""One rank of the shared-filesystem test (tests/test_shared_run_folder.py): two gloo ranks set up a
run whose folder all ranks share, then one whose folder each rank has on a disk of its own (the
same run name under a different output folder per rank, as node-local disks would give).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/shared_fs_worker.py \\
        --policy PATH --out DIR
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from torchrun_worker import report_and_exit  # (run as a script: tests/ is on sys.path)

from refuel_agents.refuel import RefuelConfig, RefuelTrainer

CONFIGS = Path(__file__).resolve().parent.parent / "refuel_agents" / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="tiny policy checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for rank<r>.json and the runs")
    args = parser.parse_args()
    rank = int(os.environ["RANK"])

    def setup(output_dir: Path) -> str | None:
        config = RefuelConfig(policy_model=args.policy, env_kwargs={"user": "instant", "max_turns": 2, "tokenizer": None},
                              reference_kl=False, batch_size=2, micro_batch_size=1, eval_prompts=0, progress=False,
                              deepspeed=str(CONFIGS / "deepspeed_zero2.json"), output_dir=str(output_dir), run_name="run")
        try:
            RefuelTrainer(config).setup()
        except RuntimeError as err:
            return str(err)
        return None

    report = {"shared": setup(args.out / "shared"), "local": setup(args.out / f"node{rank}"),
              "leftover_markers": [str(p) for p in args.out.rglob(".shared-filesystem")]}
    report_and_exit(args.out, rank, report)


if __name__ == "__main__":
    main()
