"""Train a chat policy in a refuel-gym environment.

    python scripts/train_agent.py --agent refuel                             # embedded default, CPU, 13 minutes
    python scripts/train_agent.py --agent refuel --preset paper-setting-one  # the paper's setting one
    python scripts/train_agent.py --agent refuel --iterations 3 --prompts-per-iteration 16 --lr 2e-6
    python scripts/train_agent.py --agent refuel --run-name my-run --resume  # continue after a crash
    python scripts/train_agent.py --agent rebel --mode lt-online             # a baseline (paper section 4.1)
    python scripts/train_agent.py --agent dpo --mode lt-mixed --beta 0.1
    python scripts/train_agent.py --config run.yaml --lr 2e-6                # a config file; flags override it

Installed (pip install .), the same command is ``refuel-train``. ``--config FILE`` reads a YAML or JSON
mapping of flag names to values (``lr: 2.0e-6``, ``env_kwargs: {max_turns: 3}``, ``agent: rebel``); flags
given on the command line override the file.

Agents: ``refuel`` (algorithm 1: on-policy roll-in to h ~ U{1..H}, two on-policy rollouts to H,
the regression of eq. 1); ``rebel`` (the same regression) and ``dpo`` (the logistic loss on pairs
ordered by reward, ties dropped) on the data of one ``--mode``, required for them and refused for
refuel:

    lt-offline  dataset state s_H, the dataset's chosen / rejected replies at the last turn H
    lt-mixed    dataset state s_H, two policy responses at H
    lt-online   the policy rolls in to s_H with the simulated user, two policy responses at H
    mt-mixed    dataset state s_h at h ~ U{1..H}, two policy rollouts from s_h to H

In the dataset-state modes H is the dataset dialogue's number of turns (refuel_agents.modes).
DPO's reference is the iteration's frozen policy pi_t (--reference-policy iteration, default) or
the initial policy (--reference-policy initial).

Every flag below sets a field of the agent's config (``refuel_agents.refuel.RefuelConfig``,
``refuel_agents.baselines.RebelConfig`` / ``DpoConfig``); ``--preset`` sets several at once and
explicit flags override it. A run writes
``<output-dir>/<run-name>/``: config.json, metrics.jsonl, tensorboard/, iteration_*/tuples
(the collected data, a ``datasets.Dataset``), checkpoints/ (the newest --keep-checkpoints), summary.json and
summary.md (the held-out improvement with its bootstrap interval), heldout_reward.png, reward_loss.png and
final_model/ (loadable with ``from_pretrained``).

Multi-GPU / multi-node (DeepSpeed ZeRO-3):

    deepspeed --num_gpus 8 scripts/train_agent.py --agent refuel --preset paper-setting-one \\
        --deepspeed refuel_agents/configs/deepspeed_zero3.json
    accelerate launch --config_file refuel_agents/configs/accelerate_multi_gpu.yaml scripts/train_agent.py ...
    python scripts/launch_paper_setting_one.py     # setting one: the 70 B user on `vllm serve`, then training

With W ranks each collects and trains on its own shard of every iteration's prompts; --batch-size
is the global batch (batch_size / W pairs per rank per update).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from refuel_agents import checkpoint as ckpt
from refuel_agents.baselines import AGENTS
from refuel_agents.cli import (
    add_dataclass_arguments,
    check_output_dir,
    config_file_argv,
    dataclass_from_args,
    load_config_file,
    split_config_flag,
)
from refuel_agents.modes import BASELINE_MODES, MODE_HELP
from refuel_agents.prompt_plan import PromptPlan

# The paper's configurations (appendix C; DESIGN.md). Every value's source is in the preset table of docs/training.md.
# Models must be in the local HF cache.
_SETTING_TWO = {
    "policy_model": "meta-llama/Meta-Llama-3-8B-Instruct", "iterations": 0, "prompts_per_iteration": 32,
    "batch_size": 32, "micro_batch_size": 1, "epochs": 4, "eta": 1.0, "loss_scale": "paper", "lr": 3e-7,
    "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 1e-6, "warmup_ratio": 0.0, "lr_schedule": "linear",
    "schedule_scope": "run", "max_grad_norm": 0.0, "last_k_layers": 4, "temperature": 1.0,
    "gradient_checkpointing": True, "eval_prompts": 0,
}
PRESETS: dict[str, dict] = {
    # The embedded default: chosen to show learning within 15 minutes on 2 CPU cores (sources: README, "The default run").
    "embedded": {
        "env_kwargs": {"max_turns": 3, "user_max_new_tokens": 48, "user_temperature": 0.0},
        "iterations": 5, "prompts_per_iteration": 16, "epochs": 2, "eta": 10.0, "lr": 3e-5, "last_k_layers": 8,
        "eval_temperature": 0.0, "eval_every": 2,
    },
    "paper-setting-one": {
        "env_id": "UltraInteractDialogue-v0", "env_preset": "paper-setting-one", "env_kwargs": {},
        "policy_model": "meta-llama/Meta-Llama-3-8B-Instruct", "iterations": 2, "prompts_per_iteration": 0,
        "batch_size": 128, "micro_batch_size": 1, "epochs": 1, "eta": 1e3, "loss_scale": "original", "lr": 3e-7,
        "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 1e-6, "warmup_ratio": 0.1, "lr_schedule": "cosine",
        "schedule_scope": "iteration", "max_grad_norm": 0.0, "max_new_tokens": 1024, "temperature": 0.8,
        "max_seq_len": 2048, "gradient_checkpointing": True, "eval_prompts": 0,
    },
    "paper-setting-two-hh": {
        "env_id": "AnthropicHHPresampled-v0", "env_preset": "paper-setting-two-hh", "env_kwargs": {},
        **_SETTING_TWO, "max_new_tokens": 512, "max_seq_len": 2048,
    },
    "paper-setting-two-ultrainteract": {
        "env_id": "UltraInteractPresampled-v0", "env_preset": "paper-setting-two-ultrainteract", "env_kwargs": {},
        **_SETTING_TWO, "max_new_tokens": 1024,
        "max_new_tokens_by_h": {"1": 1024, "2": 768, "3": 512, "4": 512, "5": 512}, "max_seq_len": 3200,
    },
}


def build_parser(agent: str, preset: str, parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = parser_class(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="a YAML or JSON file of flag names and values; explicit flags override it")
    parser.add_argument("--agent", choices=sorted(AGENTS), default=agent, help="which algorithm to train (default: %(default)s)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=preset,
                        help="a named configuration; explicit flags override it (default: %(default)s)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the process's rank is read from LOCAL_RANK")
    if agent == "refuel":
        parser.add_argument("--mode", choices=BASELINE_MODES, default=None,
                            help="data mode of the baselines only (--agent rebel or dpo; see above); refused for refuel")
    config_cls, _ = AGENTS[agent]
    add_dataclass_arguments(parser, config_cls, replace(config_cls(), **PRESETS[preset]))
    return parser


def parse_config(argv: list[str]) -> tuple[str, Any]:
    """(the agent, its config) from the command line (and a --config file); argparse's exit on bad flags."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--agent", choices=sorted(AGENTS), default="refuel")
    first.add_argument("--preset", choices=sorted(PRESETS), default="embedded")
    first.add_argument("--mode", default=None)
    try:
        config_path, argv = split_config_flag(argv)
        if config_path is not None:  # the file's flags first: explicit flags, later on the line, win
            values = load_config_file(config_path)
            first.set_defaults(**{k: values[k] for k in ("agent", "preset", "mode") if k in values})
            known, _ = first.parse_known_args(argv)
            argv = config_file_argv(config_path, values, build_parser(known.agent, known.preset)) + argv
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    # --agent and --preset decide the other flags' defaults: read them first.
    known, _ = first.parse_known_args(argv)
    asking_help = any(a in ("-h", "--help") for a in argv)
    if known.agent == "refuel" and known.mode is not None:
        raise SystemExit(f"error: --mode {known.mode} is for the baselines (--agent rebel or dpo); REFUEL collects its "
                         "own data (on-policy roll-in, two on-policy rollouts from h ~ U{1..H}) and takes no --mode")
    if known.agent != "refuel" and known.mode not in BASELINE_MODES and not asking_help:
        given = "no --mode was given" if known.mode is None else f"--mode {known.mode} is not one of them"
        raise SystemExit(f"error: --agent {known.agent} needs --mode, one of {', '.join(BASELINE_MODES)} ({given}):\n"
                         + "\n".join(f"  {m:<11} {MODE_HELP[m]}" for m in BASELINE_MODES))
    args = build_parser(known.agent, known.preset).parse_args(argv)
    return args.agent, dataclass_from_args(AGENTS[args.agent][0], args)


def main(argv: list[str] | None = None) -> None:
    agent, config = parse_config(sys.argv[1:] if argv is None else list(argv))
    try:
        check_config(agent, config)
        trainer = AGENTS[agent][1](config)
        trainer.setup()
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        raise SystemExit(f"error: {err}") from err
    trainer.train()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # a clean teardown, not gloo/NCCL threads at exit
        dist.barrier()
        dist.destroy_process_group()


def check_config(agent: str, config) -> None:
    """Everything that can be checked before a model loads: the fields, the output folder, and with
    --resume the run folder and its config.json against these flags."""
    try:
        config.validate()
        invalid = None
    except ValueError as err:
        invalid = err
    name = config.run_name
    if config.resume and isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name:
        # flags that differ from the run's own are named first: they are the likelier mistake
        mode = "refuel" if agent == "refuel" else config.mode
        ckpt.check_resumable(Path(config.output_dir) / name, ckpt.run_record(agent, mode, config))
    if invalid is not None:
        raise invalid
    check_output_dir(config.output_dir)
    if config.eval_prompts > 0:  # more held-out prompts than the split has: refused before any model loads
        from refuel_env.components import preset_kwargs

        env_kwargs = preset_kwargs(config.env_id, config.env_preset, config.env_kwargs)
        PromptPlan(config.env_id, env_kwargs, config.seed, config.prompts_per_iteration, config.iterations,
                   config.eval_split, config.eval_prompts).heldout()


if __name__ == "__main__":
    main()
