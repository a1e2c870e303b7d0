"""The memory of each GPU, phase by phase, for a preset on N GPUs: what must fit before a run starts.

    python scripts/memory_plan.py --preset paper-setting-one --gpus 8 --gpu-memory-gb 80
    python scripts/memory_plan.py --preset paper-setting-one --gpus 8 --gpu-memory-gb 40   # exits 1, naming the phase
    python scripts/memory_plan.py --preset paper-setting-one --gpus 8 --json plan.json
    python scripts/memory_plan.py --preset paper-setting-one --gpus 8 -- --micro-batch-size 2   # train_agent.py flags

The run it describes is the one ``scripts/launch_paper_setting_one.py`` starts: the preset's
``train_agent.py`` configuration plus the launcher's flags (for a preset whose simulated user is
served: ZeRO-3, the vLLM policy replica, asleep while scoring and training, with the
``gpu_memory_utilization`` this plan computes), then any ``train_agent.py`` flags after ``--``.
When the simulated user is served (``user_backend`` openai), ``--user-gpus`` of the GPUs (half by
default) serve it with ``vllm serve`` and the others train.

For each phase (collection, scoring, training, evaluation) it prints every item a training GPU holds,
its arithmetic and its size, and the phase's peak; then the user's GPUs. The figures come from
``refuel_agents.memory_ledger`` and the models' ``config.json``: the shipped ones
(``refuel_agents/configs/models/``) for the presets' models, or ``--policy-config`` /
``--reward-config`` / ``--user-config``. No weights are read and nothing is downloaded.

Exit status: 0 when every phase fits, 1 when one does not (the message names it), 2 for bad flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from refuel_agents import memory_ledger as ledger  # noqa: E402
from refuel_agents.refuel_config import RefuelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ZERO3 = ROOT / "refuel_agents" / "configs" / "deepspeed_zero3.json"
USER_SERVE_UTILIZATION = 0.9
"""``vllm serve --gpu-memory-utilization`` of the user's server (the launcher's default)."""


def plan_flags() -> list[str]:
    """``train_agent.py`` flags the launcher adds for a served user: ZeRO-3 and a sleeping vLLM policy replica."""
    return ["--deepspeed", str(ZERO3), "--policy-backend", "vllm", "--policy-vllm-sleep"]


def preset_config(preset: str, train_args: list[str]) -> RefuelConfig:
    """The ``RefuelConfig`` that ``train_agent.py --agent refuel --preset <preset> <train_args>`` runs."""
    import train_agent

    from refuel_agents.cli import dataclass_from_args

    if preset not in train_agent.PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r}; choose one of {sorted(train_agent.PRESETS)}")
    args = train_agent.build_parser("refuel", preset).parse_args(["--preset", preset, *train_args])
    return dataclass_from_args(RefuelConfig, args)


def served_user(config: RefuelConfig) -> tuple[str, dict] | None:
    """(user model, user_openai_kwargs) when the environment's simulated user is served over HTTP, else None."""
    from refuel_env.components import make_config

    env = make_config(config.env_preset, **config.env_kwargs)
    if env.user_backend != "openai":
        return None
    return str(env.user_model), dict(env.user_openai_kwargs or {})


@dataclass
class Setting:
    """A preset on a number of GPUs: who trains, who serves the user, and the memory of each."""

    config: RefuelConfig
    train_gpus: int
    user_gpus: int
    nodes: int
    plan: ledger.MemoryPlan
    user: dict | None

    @property
    def world(self) -> int:
        return self.train_gpus * self.nodes

    def failing(self) -> list[str]:
        return self.plan.failing() + (["user"] if self.user and not self.user["fits"] else [])


def _shape(path: str | None, name: str, flag: str) -> ledger.ModelShape:
    if path:
        return ledger.ModelShape.from_config(path)
    if (Path(name) / "config.json").is_file():  # a local checkpoint folder
        return ledger.ModelShape.from_config(name, name=name)
    try:
        return ledger.ModelShape.from_config(ledger.shipped_config(name), name=name)
    except KeyError as err:
        raise SystemExit(f"error: no shipped config.json for the model {name!r}; pass its config.json with {flag}") from err


def user_plan(shape: ledger.ModelShape, gpus: int, gpu_memory_gb: float, openai_kwargs: dict, train_ranks: int) -> dict:
    """The user's server: tensor parallel over ``gpus``, ``--gpu-memory-utilization`` 0.9 of each."""
    budget = USER_SERVE_UTILIZATION * gpu_memory_gb * ledger.GB
    weights = shape.parameters * 2 / gpus
    workspace = ledger.VLLM_WORKSPACE_GB * ledger.GB
    kv_per_gpu = budget - weights - workspace
    kv_token = shape.kv_bytes_per_token(2)
    tokens = int(max(kv_per_gpu, 0) * gpus // kv_token)
    context = int(openai_kwargs.get("max_context") or 8192)
    concurrency = int(openai_kwargs.get("max_concurrency") or 1)
    return {"model": shape.name, "gpus": gpus, "parameters": shape.parameters, "weights_per_gpu": int(weights),
            "budget_per_gpu": int(budget), "kv_cache_per_gpu": int(kv_per_gpu), "kv_bytes_per_token": kv_token,
            "kv_tokens": tokens, "context": context, "contexts_held": tokens / context,
            "requests_in_flight": train_ranks * concurrency, "fits": kv_per_gpu >= kv_token * context / gpus}


def setting(preset: str, gpus: int, gpu_memory_gb: float, *, user_gpus: int | None = None, nodes: int = 1,
            train_args: list[str] = (), policy_config: str | None = None, reward_config: str | None = None,
            user_config: str | None = None, allowance_gb: float = ledger.DEFAULT_ALLOWANCE_GB) -> Setting:
    """The plan of ``preset`` on ``nodes`` nodes of ``gpus`` GPUs of ``gpu_memory_gb`` each, as the launcher runs it."""
    if gpus < 1:
        raise SystemExit(f"error: --gpus must be >= 1, got {gpus}")
    if gpu_memory_gb <= 0:
        raise SystemExit(f"error: --gpu-memory-gb must be > 0, got {gpu_memory_gb}")
    base = preset_config(preset, list(train_args))
    user = served_user(base)
    if user is None:
        user_gpus = 0 if user_gpus is None else user_gpus
        config = base
    else:
        user_gpus = gpus // 2 if user_gpus is None else user_gpus
        config = preset_config(preset, plan_flags() + list(train_args))
    if not 0 <= user_gpus < gpus:
        raise SystemExit(f"error: --user-gpus must leave at least one of the {gpus} GPUs to train, got {user_gpus}")
    if user is not None and user_gpus == 0:
        raise SystemExit("error: the preset's user is served (vllm serve): give it GPUs with --user-gpus >= 1")
    train = gpus - user_gpus
    world = train * nodes
    if config.batch_size % world:
        raise SystemExit(f"error: batch_size {config.batch_size} is not a multiple of the {world} training ranks")
    policy = _shape(policy_config, config.policy_model, "--policy-config")
    reward_name = ledger_reward_name(config)  # None: the embedded reward model, or an object
    reward = _shape(reward_config, reward_name, "--reward-config") if reward_name else None
    plan = ledger.plan_for(config, world=world, policy=policy, reward=reward, gpu_memory_gb=gpu_memory_gb,
                           device="cuda", allowance_gb=allowance_gb)
    user_row = None
    if user is not None:
        shape = _shape(user_config, user[0], "--user-config")
        user_row = user_plan(shape, user_gpus, gpu_memory_gb, user[1], train)
    return Setting(config, train, user_gpus, nodes, plan, user_row)


def ledger_reward_name(config: RefuelConfig) -> str | None:
    """The environment's reward model name when it is a model the training GPU holds, else None."""
    from refuel_env.components import make_config

    env = make_config(config.env_preset, **config.env_kwargs)
    name = env.reward_model
    return name if isinstance(name, str) and name not in ("embedded",) else None


def _g(n: float) -> str:
    return f"{n / ledger.GB:.1f}"


def render(s: Setting, gpu_memory_gb: float) -> str:
    """The plan as Markdown: one table per phase, then the user's GPUs."""
    plan, lines = s.plan, []
    lines.append(f"{s.nodes} node(s) x {s.train_gpus + s.user_gpus} GPUs of {gpu_memory_gb:g} GB: {s.train_gpus} training "
                 f"rank(s) per node (W = {s.world}, ZeRO stage {_stage(s.config)}), {s.user_gpus} GPU(s) for the user's server.")
    if plan.vllm_gpu_memory_utilization is not None:
        lines.append(f"vLLM policy replica: gpu_memory_utilization {plan.vllm_gpu_memory_utilization:.2f}"
                     f"{', asleep while scoring and training' if s.config.policy_vllm_sleep else ''}.")
    for phase, rows in plan.rows.items():
        status = "fits" if phase not in plan.failing() else "DOES NOT FIT"
        lines += ["", f"### {phase}: peak {_g(plan.peak(phase))} GB of {gpu_memory_gb:g} ({status})", "",
                  "| item | what | arithmetic | GB |", "|---|---|---|---|"]
        lines += [f"| {r.item} | {r.what} | {r.arithmetic} | {_g(r.bytes)} |" for r in rows]
        lines.append(f"| allowance | CUDA context, NCCL, fragmentation (assumed) | | {_g(plan.allowance_bytes)} |")
        lines.append(f"| **peak** | | | **{_g(plan.peak(phase))}** |")
        if phase in plan.problems:
            lines.append(f"\n{plan.problems[phase]}")
    if s.user:
        u = s.user
        lines += ["", f"### the user's GPUs: {u['model']}, tensor parallel {u['gpus']}"
                  f" ({'fits' if u['fits'] else 'DOES NOT FIT'})", "",
                  "| item | arithmetic | GB per GPU |", "|---|---|---|",
                  f"| budget | --gpu-memory-utilization {USER_SERVE_UTILIZATION} x {gpu_memory_gb:g} GB | {_g(u['budget_per_gpu'])} |",
                  f"| weights | {u['parameters']:,} x 2 B / {u['gpus']} | {_g(u['weights_per_gpu'])} |",
                  f"| workspace | assumed | {ledger.VLLM_WORKSPACE_GB:.1f} |",
                  f"| KV cache | the rest: {u['kv_tokens']:,} tokens in all at {u['kv_bytes_per_token']:,} B/token "
                  f"({u['contexts_held']:.0f} contexts of {u['context']} tokens) | {_g(u['kv_cache_per_gpu'])} |",
                  "", f"Requests in flight: {s.world} ranks x max_concurrency = {u['requests_in_flight']} (over the "
                  f"{s.nodes} node(s)' servers); vLLM queues those its KV cache cannot hold."]
    lines += ["", "Notes:"] + [f"- {n}" for n in plan.notes] + ["", "Assumptions:"] + [f"- {a}" for a in plan.assumptions]
    return "\n".join(lines)


def _stage(config: RefuelConfig) -> int:
    if not config.deepspeed:
        return 0
    return int(json.loads(Path(config.deepspeed).read_text()).get("zero_optimization", {}).get("stage", 0))


def to_dict(s: Setting) -> dict:
    return {"train_gpus_per_node": s.train_gpus, "user_gpus_per_node": s.user_gpus, "nodes": s.nodes, "world": s.world,
            "policy_model": s.config.policy_model, "deepspeed": s.config.deepspeed, "policy_backend": s.config.policy_backend,
            "policy_vllm_sleep": s.config.policy_vllm_sleep, **s.plan.to_dict(), "user": s.user,
            "failing": s.failing()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper-setting-one",
                        help="a train_agent.py preset (default: %(default)s)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node, the user's and the training ranks' (default: %(default)s)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0,
                        help="memory of one GPU in GB of 1e9 bytes (default: %(default)s, an H100 80 GB counted low)")
    parser.add_argument("--user-gpus", type=int, default=None,
                        help="GPUs per node that serve the simulated user (default: half of --gpus when the preset's "
                             "user is served over HTTP, else 0)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes, each laid out alike (default: %(default)s)")
    parser.add_argument("--policy-config", default=None,
                        help="the policy's config.json (default: the shipped one for the preset's policy_model)")
    parser.add_argument("--reward-config", default=None,
                        help="the reward model's config.json (default: the shipped one for the environment's reward_model)")
    parser.add_argument("--user-config", default=None,
                        help="the served user's config.json (default: the shipped one for the environment's user_model)")
    parser.add_argument("--allowance-gb", type=float, default=ledger.DEFAULT_ALLOWANCE_GB,
                        help="per GPU, for the CUDA context, NCCL buffers and fragmentation (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the plan as JSON to PATH")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(own)
    if args.nodes < 1:
        raise SystemExit(f"error: --nodes must be >= 1, got {args.nodes}")
    s = setting(args.preset, args.gpus, args.gpu_memory_gb, user_gpus=args.user_gpus, nodes=args.nodes,
                train_args=train_args, policy_config=args.policy_config, reward_config=args.reward_config,
                user_config=args.user_config, allowance_gb=args.allowance_gb)
    print(render(s, args.gpu_memory_gb))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_dict(s), indent=2) + "\n")
    failing = s.failing()
    for phase in failing:
        if phase == "user":
            u = s.user
            print(f"error: the user's server does not fit: {_g(u['weights_per_gpu'])} GB of weights per GPU leave "
                  f"{_g(max(u['kv_cache_per_gpu'], 0))} GB of KV cache, less than one {u['context']}-token context; "
                  "give it more GPUs (--user-gpus) or larger ones", file=sys.stderr)
        else:
            why = s.plan.problems.get(phase) or (f"needs {_g(s.plan.peak(phase))} GB per training GPU, more than "
                                                 f"--gpu-memory-gb {args.gpu_memory_gb:g}")
            print(f"error: the {phase} phase does not fit: {why}", file=sys.stderr)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
