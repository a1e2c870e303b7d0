"""One rank of the placement test (tests/test_placement.py): two gloo ranks on a CPU that pretend to
have two CUDA devices, and where each rank puts every model it holds.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/placement_worker.py \\
        --policy PATH --out DIR

The machine has no GPU, so CUDA is simulated at its boundary: ``torch.cuda.is_available`` /
``device_count`` / ``set_device`` / ``current_device`` say there are two devices, and
``nn.Module.to`` records every move of a module to a CUDA device (module, device) and keeps the
tensors on the CPU. DeepSpeed runs on its CPU accelerator. Three trainers are built on each rank:

* the paper's setting one (preset ``paper-setting-one``, vLLM replica asleep while training): its
  8B models cannot be built here, so the decided devices are reported (the policy is the tiny one);
* ZeRO-2 with a tiny transformers user and the embedded reward model: every real ``.to``;
* ZeRO-3: the policy and pi_0 built sharded (zero.Init), each rank's partition sizes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torchrun_worker import report_and_exit  # (run as a script: tests/ is on sys.path)

EVENTS: list[list] = []  # ["set_device", index] and ["to", id(module), class name, device], in order
_current = [0]


def _set_device(device) -> None:
    index = device if isinstance(device, int) else torch.device(device).index
    EVENTS.append(["set_device", index])
    _current[0] = index


_module_to = torch.nn.Module.to


def _to(self, *args, **kwargs):
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    if device is None or device.type != "cuda":
        return _module_to(self, *args, **kwargs)
    index = _current[0] if device.index is None else device.index
    EVENTS.append(["to", id(self), type(self).__name__, f"cuda:{index}"])
    return _module_to(self, "cpu", dtype) if dtype is not None else _module_to(self, "cpu")


torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 2
torch.cuda.set_device = _set_device
torch.cuda.current_device = lambda: _current[0]
torch.nn.Module.to = _to

CONFIGS = Path(__file__).resolve().parent.parent / "refuel_agents" / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="tiny policy (and user) checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for rank<r>.json and the runs")
    args = parser.parse_args()

    from refuel_agents.refuel import RefuelConfig, RefuelTrainer
    from refuel_env.components import _reward_model, user_generator

    rank = int(os.environ["RANK"])
    common = dict(policy_model=args.policy, iterations=1, prompts_per_iteration=2, batch_size=2, micro_batch_size=1,
                  eval_prompts=0, output_dir=str(args.out), progress=False)
    report: dict = {"rank": rank}

    paper = RefuelTrainer(RefuelConfig(
        **common, env_id="UltraInteractDialogue-v0", env_preset="paper-setting-one", env_kwargs={},
        policy_backend="vllm", policy_vllm_sleep=True, deepspeed=str(CONFIGS / "deepspeed_zero3.json"), run_name="paper"))
    report["paper"] = {"placement": paper.placement.as_dict(), "reward_device": paper.env_kwargs.get("reward_device"),
                       "reward_model": paper._env_config().reward_model}

    env_kwargs = {"max_turns": 2, "user_model": args.policy, "user_max_new_tokens": 4, "tokenizer": None}
    zero2 = RefuelTrainer(RefuelConfig(**common, env_kwargs=env_kwargs, deepspeed=str(CONFIGS / "deepspeed_zero2.json"),
                                       run_name="zero2"))
    zero2.setup()
    assert zero2.plan.iterations == 1  # builds the environment: its user and reward model are loaded now
    env = zero2._env_config()
    report["zero2"] = {
        "placement": zero2.placement.as_dict(),
        "ids": {"policy": id(zero2.model), "user": id(user_generator(env).model),
                "reward": id(_reward_model(env.reward_model, env.reward_device).model)},
    }

    zero3 = RefuelTrainer(RefuelConfig(**common, env_kwargs=env_kwargs, deepspeed=str(CONFIGS / "deepspeed_zero3.json"),
                                       run_name="zero3"))
    zero3.setup()

    def partition(module: torch.nn.Module) -> dict:
        params = list(module.parameters())
        return {"sharded": all(hasattr(p, "ds_tensor") for p in params),
                "full_numel": sum(int(p.ds_numel) for p in params if hasattr(p, "ds_numel")),
                "local_numel": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
                "data_numel": sum(p.data.numel() for p in params)}

    report["zero3"] = {"placement": zero3.placement.as_dict(), "policy": partition(zero3.model),
                       "reference": partition(zero3.reference), "same_module": zero3.reference is zero3.model,
                       "reference_engine": id(zero3.reference) in zero3.engine.frozen_engines}
    report["events"] = EVENTS
    report_and_exit(args.out, rank, report)


if __name__ == "__main__":
    main()
