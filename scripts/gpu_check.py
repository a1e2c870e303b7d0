"""A check of the training code on one CUDA GPU, in under 5 minutes, with no downloads.

    python scripts/gpu_check.py                          # report in runs/gpu_check.json
    python scripts/gpu_check.py --output /tmp/check.json --only gradients match_precision

Every model is random-initialised from a shipped ``config.json`` (``refuel_agents/configs/models/``:
the SmolLM2-135M and Llama-3-8B shapes) and uses the tokenizer the package ships (the embedded
SmolLM2's). Only the package's own dependencies are needed (no DeepSpeed, no vLLM). Checks:

- ``train_loop``: ``scripts/train_agent.py --device cuda``, two iterations of 16 prompts with a
  held-out evaluation, a random SmolLM2-shaped policy and simulated user, a random one-label reward
  model, all on the GPU; passes when it exits 0 and writes its summary.
- ``gradients``: eq. 1's gradient with the shared prefix (one packed row per pair) against two
  unshared sequences per pair, on the Llama-3-8B shape in bf16 with gradient checkpointing (8 of its
  32 layers when the GPU has under 70 GB); passes when the largest difference, relative to the
  largest gradient, is at most twice the bf16 noise floor: the larger difference of the unshared
  batch from itself with its pairs reordered, or with 64 more padding columns (other kernel shapes).
- ``ledger``: ``refuel_agents.memory_ledger``'s training-phase tensors for a one-GPU plain run of
  the SmolLM2 shape against ``torch.cuda.max_memory_allocated`` over one step; passes within 25 %.
- ``match_precision``: pi_0 put in the trained model's precision (fp32 weights, bf16 autocast) gives
  the same sequence log-probs as the trained model within 0.01 nats.

Writes a JSON report (``--output``) and exits 0 when every check passes, 1 when one fails, and 2,
saying so, on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHECKS = ("train_loop", "gradients", "ledger", "match_precision")


def random_model(shape: str, *, dtype, device, layers: int | None = None, reward: bool = False, seed: int = 0):
    """A random-initialised model of a shipped shape, in ``dtype`` on ``device``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from refuel_agents.memory_ledger import shipped_config

    config = AutoConfig.from_pretrained(shipped_config(shape))
    if layers is not None:
        config.num_hidden_layers = layers
    if reward:
        config.num_labels = 1
        config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    torch.manual_seed(seed)
    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    with torch.device(device):
        model = cls.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


def tokenizer():
    from transformers import AutoTokenizer

    from refuel_env import embedded

    return AutoTokenizer.from_pretrained(embedded.smollm2_path())


def check_train_loop(work: Path, device: str = "cuda", timeout: float = 180) -> dict:
    """train_agent.py end to end on ``device`` with random SmolLM2-shaped models."""
    import torch

    tok = tokenizer()
    dirs = {}
    for name, reward, seed in (("policy", False, 0), ("user", False, 1), ("reward", True, 2)):
        model = random_model("embedded", dtype=torch.float32, device="cpu", reward=reward, seed=seed)
        dirs[name] = work / name
        model.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    env_kwargs = {"user_model": str(dirs["user"]), "user_device": device, "reward_model": str(dirs["reward"]),
                  "reward_device": device, "max_turns": 3, "user_max_new_tokens": 24}
    command = [sys.executable, str(ROOT / "scripts" / "train_agent.py"), "--agent", "refuel", "--device", device,
               "--policy-model", str(dirs["policy"]), "--env-kwargs", json.dumps(env_kwargs), "--iterations", "2",
               "--prompts-per-iteration", "16", "--eval-prompts", "4", "--max-new-tokens", "48", "--batch-size", "4",
               "--micro-batch-size", "2", "--output-dir", str(work / "runs"), "--run-name", "gpu-check", "--no-progress"]
    start = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "seconds": timeout, "error": f"train_agent.py ran past {timeout:g} s"}
    summary = work / "runs" / "gpu-check" / "summary.json"
    result = {"ok": proc.returncode == 0 and summary.is_file(), "seconds": round(time.monotonic() - start, 1),
              "returncode": proc.returncode, "command": command}
    if summary.is_file():
        result["summary"] = json.loads(summary.read_text())
    if not result["ok"]:
        result["stderr_tail"] = proc.stderr[-4000:]
    return result


def _pairs(vocab: int, lengths: list[tuple[int, int, int]], seed: int):
    """Random token pairs (s + y, s + y') with their response masks, rewards and pi_t log-probs."""
    import torch

    from refuel_agents.logprobs import EncodedResponse

    g = torch.Generator().manual_seed(seed)
    pairs = []
    for state, y, y2 in lengths:
        s = torch.randint(10, vocab, (state,), generator=g).tolist()
        a = torch.randint(10, vocab, (y,), generator=g).tolist()
        b = torch.randint(10, vocab, (y2,), generator=g).tolist()
        pairs.append((EncodedResponse(s + a, [0] * state + [1] * y), EncodedResponse(s + b, [0] * state + [1] * y2)))
    rewards = torch.rand(len(pairs), 2, generator=g)
    logp_t = -torch.rand(len(pairs), 2, generator=g) * 100
    return pairs, rewards, logp_t


def _loss(model, pairs, rewards, logp_t, order, shared: bool, device, extra_padding: int = 0):
    import torch

    from refuel_agents.logprobs import collate, collate_shared_prefix, sequence_logprobs
    from refuel_agents.losses import refuel_loss

    chosen = [pairs[i] for i in order]
    batch = collate_shared_prefix(chosen, 0) if shared else collate([p[0] for p in chosen] + [p[1] for p in chosen], 0)
    if extra_padding:  # the same sequences in a wider batch: other kernel shapes, the same mathematics
        batch = {k: torch.nn.functional.pad(v, (0, extra_padding)) for k, v in batch.items()}
    batch = {k: v.to(device) for k, v in batch.items()}
    logp = sequence_logprobs(model, batch).float()
    n = len(chosen)
    r, t = rewards[order].to(device), logp_t[order].to(device)
    return refuel_loss(logp[:n], t[:, 0], logp[n:], t[:, 1], r[:, 0], r[:, 1], eta=1.0)


def check_gradients(device: str = "cuda", shape: str = "meta-llama/Meta-Llama-3-8B-Instruct", layers: int | None = None,
                    dtype_name: str = "bfloat16", lengths: list[tuple[int, int, int]] | None = None) -> dict:
    """Shared-prefix against unshared gradients of eq. 1, against the noise floor of reordering the pairs."""
    import torch

    dtype = getattr(torch, dtype_name)
    if layers is None and device.startswith("cuda") and torch.cuda.get_device_properties(0).total_memory < 70e9:
        layers = 8
    model = random_model(shape, dtype=dtype, device=device, layers=layers)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    lengths = lengths or [(512, 128, 256), (1024, 256, 64), (768, 512, 384), (256, 64, 128)]
    pairs, rewards, logp_t = _pairs(model.config.vocab_size, lengths, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(order, shared, extra_padding=0):
        model.zero_grad(set_to_none=True)
        _loss(model, pairs, rewards, logp_t, order, shared, device, extra_padding).backward()

    start = time.monotonic()
    grads(list(range(len(pairs))), shared=False)
    reference = [p.grad.detach().clone() for p in params]
    scale = max(float(g.abs().max()) for g in reference)

    def distance() -> float:
        return max(float((p.grad - r).abs().max()) for p, r in zip(params, reference)) / scale

    grads(list(range(len(pairs))), shared=True)
    shared = distance()
    grads(list(reversed(range(len(pairs)))), shared=False)
    reordered = distance()
    grads(list(range(len(pairs))), shared=False, extra_padding=64)
    padded = distance()
    floor = max(reordered, padded)
    reference.clear()
    model.zero_grad(set_to_none=True)
    ok = shared <= 2 * floor if dtype != torch.float32 else shared <= 1e-4
    return {"ok": bool(ok), "shape": shape, "layers": model.config.num_hidden_layers, "dtype": dtype_name,
            "pairs": lengths, "shared_vs_unshared": shared, "noise_floor": floor, "floor_reordered": reordered,
            "floor_padded": padded,
            "seconds": round(time.monotonic() - start, 1)}


def check_ledger(device: str = "cuda") -> dict:
    """The ledger's training-phase tensor bytes against torch.cuda.max_memory_allocated over one plain step."""
    from dataclasses import replace

    import torch

    from refuel_agents.engine import OptimConfig, TrainEngine
    from refuel_agents.memory_ledger import ModelShape, plan_for, shipped_config
    from refuel_agents.refuel_config import RefuelConfig

    config = replace(RefuelConfig(), max_seq_len=1024, max_new_tokens=512, micro_batch_size=1, batch_size=1,
                     gradient_checkpointing=True, reference_kl=True)
    shape = ModelShape.from_config(shipped_config("embedded"))
    total = torch.cuda.get_device_properties(0).total_memory
    plan = plan_for(config, world=1, policy=shape, reward=None, gpu_memory_gb=total / 1e9, device="cuda",
                    dialogue_tokens=1024, kl_coef=0.0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = random_model("embedded", dtype=torch.float32, device="cpu")
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    engine = TrainEngine(model, OptimConfig(lr=1e-6), 4, gradient_checkpointing=True, device=device)
    engine.match_precision(reference)
    pairs, rewards, logp_t = _pairs(shape.vocab_size, [(512, 512, 512)], seed=1)  # s + y = max_seq_len
    loss = _loss(engine.model, pairs, rewards, logp_t, [0], True, device)
    engine.backward(loss)
    engine.step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    planned = plan.tensors("training")
    ratio = measured / planned
    return {"ok": 0.75 <= ratio <= 1.25, "planned_training_bytes": planned, "measured_peak_bytes": measured,
            "ratio": ratio, "planned_items": plan.phases["training"]}


def check_match_precision(device: str = "cuda") -> dict:
    """pi_0 in the trained model's precision scores like the trained model (bf16 autocast, fp32 weights)."""
    import torch

    from refuel_agents.engine import OptimConfig, TrainEngine
    from refuel_agents.logprobs import collate, sequence_logprobs

    model = random_model("embedded", dtype=torch.float32, device="cpu", seed=3)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    engine = TrainEngine(model, OptimConfig(lr=1e-6), 4, device=device)
    engine.match_precision(reference)
    pairs, _, _ = _pairs(model.config.vocab_size, [(256, 128, 64), (128, 256, 32)], seed=2)
    batch = {k: v.to(device) for k, v in collate([p for pair in pairs for p in pair], 0).items()}
    engine.unwrapped.eval()
    with torch.no_grad():
        trained = sequence_logprobs(engine.unwrapped, batch).float()
        frozen = sequence_logprobs(reference, batch).float()
    gap = float((trained - frozen).abs().max())
    return {"ok": gap <= 0.01, "max_abs_logprob_gap_nats": gap, "bf16": bool(engine.bf16),
            "weight_dtype": str(next(reference.parameters()).dtype)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/gpu_check.json"),
                        help="where the JSON report goes (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS),
                        help="run only these checks (default: all of them)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"error: gpu_check.py needs a CUDA device, and this machine has none (torch.cuda.is_available() is "
              f"False; torch {torch.__version__}, built for CUDA {torch.version.cuda}). Run it on a machine with an "
              "NVIDIA GPU and a CUDA build of torch.", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name(0), "memory_bytes": torch.cuda.get_device_properties(0).total_memory,
              "torch": torch.__version__, "cuda": torch.version.cuda, "checks": {}}
    start = time.monotonic()
    functions = {"train_loop": None, "gradients": check_gradients, "ledger": check_ledger,
                 "match_precision": check_match_precision}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            began = time.monotonic()
            try:
                result = check_train_loop(Path(tmp)) if name == "train_loop" else functions[name]()
            except Exception as err:  # a failed check is reported, and the others still run
                result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            result.setdefault("seconds", round(time.monotonic() - began, 1))
            report["checks"][name] = result
            torch.cuda.empty_cache()
            print(f"{name}: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']} s)", flush=True)
    report["seconds"] = round(time.monotonic() - start, 1)
    report["ok"] = all(c["ok"] for c in report["checks"].values())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"report: {args.output}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
