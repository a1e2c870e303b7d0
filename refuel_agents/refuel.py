"""REFUEL (algorithm 1): collect with pi_t, regress the relative future, repeat.

    python scripts/train_agent.py --agent refuel                      # embedded default, CPU
    python scripts/train_agent.py --agent refuel --preset paper-setting-one

Each iteration t: (1) collect one tuple (s_h, y_h, y'_h, r(s_{H+1}), r(s'_{H+1})) per prompt
with pi_t through the environment (``collection.py``); (2) compute log pi_t of both responses
once, before any update, with exactly the function used in training; (3) minimise eq. 1,

    ( (1/eta) * [ (log pi(y|s) - log pi_t(y|s)) - (log pi(y'|s) - log pi_t(y'|s)) ] - (r - r') )^2,

in mini-batches for ``epochs`` passes. The policy generator wraps the very module being
trained, so collection at t + 1 sees the new weights with no save and reload.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from refuel_agents import checkpoint as ckpt
from refuel_agents import distributed as dist
from refuel_agents import heldout, lora, residency
from refuel_agents.chunks import collect_in_chunks
from refuel_agents.collection import (
    CollectionStats,
    Penalties,
    collect_refuel_tuples,
    play_dialogues,
    sampling_by_h,
)
from refuel_agents.engine import OptimConfig, TrainEngine
from refuel_agents.logprobs import (
    batched_logprobs,
    response_rows,
    sequence_logprobs,
    sequence_logprobs_and_entropy,
)
from refuel_agents.losses import LOSS_SCALES, regression_sign_agreement
from refuel_agents.prompt_plan import PromptPlan, iteration_seed
from refuel_agents.refuel_config import RefuelConfig
from refuel_agents.rollout import PolicyRollout
from refuel_agents.tracking import MetricsLogger, format_summary, report_run
from refuel_agents.tuples import collection_metrics, encode_tuples, light_row, pair_batch, store_rows
from refuel_env import embedded
from refuel_env.components import make_config, preset_kwargs
from refuel_env.generation import (
    SamplingParams,
    TextGenerator,
    TransformersGenerator,
)

# ------------------------------------------------------------------------------ trainer


class RefuelTrainer:
    """Setup, iterations of collect + train, checkpoints. One readable loop: :meth:`train`."""

    agent = "refuel"

    @property
    def mode(self) -> str:
        """The data the iterations collect (``refuel_agents.modes``): REFUEL's own, algorithm 1."""
        return "refuel"

    @property
    def label(self) -> str:
        """Agent and data mode as one name, used in the default run name."""
        return self.agent if self.mode == "refuel" else f"{self.agent}-{self.mode}"

    def __init__(self, config: RefuelConfig, *, reward_model: Any = None):
        config.validate()
        self.config = config
        self.rank, self.world = dist.rank_and_world()
        self.rank_batch_size = dist.rank_batch_size(config.batch_size, config.micro_batch_size, self.world)
        torch.manual_seed(config.seed)
        self.env_kwargs = preset_kwargs(config.env_id, config.env_preset, config.env_kwargs)  # every argument given wins
        if reward_model is not None:
            self.env_kwargs["reward_model"] = reward_model
        # Where every model of this rank goes, decided before any is loaded; the rank's GPU is made current.
        self.placement = residency.placement(config.device, self._env_config(), vllm=config.policy_backend == "vllm")
        self.residency = residency.Residency(self.placement)  # and what is resident in each phase
        self.env_kwargs.update(self.placement.env_kwargs())  # the reward model and a transformers user: the rank's GPU
        self.device = self.placement.policy
        default_name = f"{config.env_id}__{self.label}__{config.seed}__{int(time.time())}"
        self.run_dir = Path(config.output_dir) / (config.run_name or default_name)
        path = str(embedded.smollm2_path()) if config.policy_model == "embedded" else config.policy_model
        model, tokenizer, reference = residency.load_policy(path, config.deepspeed, self.world, self.device,
                                                            reference=config.reference_kl and not config.lora_r)
        self.generator = TransformersGenerator(model, tokenizer, name=path)
        self.tokenizer = self.generator.tokenizer
        # Training reads right-padded batches; generation pads on the left: separate tokenizer copies.
        self.train_tokenizer = copy.copy(self.tokenizer)
        self.model = lora.apply(self.generator.model, config)  # LoRA: adapters in place, the generator samples with them
        self.rollout = PolicyRollout(self.generator, self.model, path, config, self.rank, self.world)  # (rollout.py)
        if config.policy_backend == "vllm" and self.world == 1:
            self.rollout.start_replica()
        # pi_0, frozen: the copy built sharded above (ZeRO-3), the module with its adapters off (LoRA: no copy), or a
        # frozen copy; put in the trained model's precision once the engine exists (match_precision).
        self.reference = None if not config.reference_kl else (
            reference.eval().requires_grad_(False) if reference is not None else lora.initial_policy(self.model))
        self.pad_id = self.tokenizer.pad_token_id
        self.logprob_temperature = config.logprob_temperature or (config.temperature if config.temperature > 0 else 1.0)
        self.sampling = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature)
        self.engine: TrainEngine | None = None
        self._state: dict | None = None
        env_config = self._env_config()
        self.max_turns = env_config.max_turns
        self.collection_sampling = sampling_by_h(self.sampling, config.max_new_tokens_by_h, self.max_turns)
        self.eval_sampling = self.collection_sampling if config.eval_temperature is None else sampling_by_h(
            replace(self.sampling, temperature=config.eval_temperature), config.max_new_tokens_by_h, self.max_turns)
        # Collection applies Gamma itself, from how each covered generation ended (collection.py);
        # the environment's token-counting Gamma is off there. Evaluation keeps the environment's.
        self.penalties = Penalties(env_config.truncation_penalty, env_config.kl_coef, config.penalty_turns)
        self.collect_env_kwargs = {**self.env_kwargs, **({} if env_config.truncation_penalty is None
                                                         else {"truncation_penalty": None})}
        self.plan = PromptPlan(config.env_id, self.env_kwargs, config.seed, config.prompts_per_iteration,
                               config.iterations, config.eval_split, config.eval_prompts)
        self._bars = config.progress and self.rank == 0  # per-phase progress bars on the main rank
        self._collected: list[dict] | None = None  # every rank's tuples of the current iteration (metrics only)

    # -------------------------------------------------------------- pieces

    @property
    def iterations(self) -> int:
        """T; ``iterations=0`` in the config means one pass over the split's prompts."""
        return self.plan.iterations

    def prompt_indices(self, iteration: int) -> list[int]:
        """The dataset items iteration ``iteration`` collects from (:class:`PromptPlan`)."""
        return self.plan.prompts(iteration)

    def rank_prompts(self, indices: list[int], iteration: int) -> tuple[list[int], int]:
        """This rank's shard of an iteration's prompts and its collection seed (:func:`distributed.rank_prompts`)."""
        return dist.rank_prompts(indices, self.rank, self.world, iteration_seed(self.config.seed, iteration), iteration)

    def collect(self, iteration: int) -> tuple[list[dict], CollectionStats]:
        """This rank's tuples of iteration ``iteration`` (its shard of :meth:`prompt_indices`), stored in chunks;
        phase 'collection' (what is resident on a training GPU meanwhile: ``residency.py``)."""
        cfg = self.config
        self.model.eval()
        indices, seed = self.rank_prompts(self.prompt_indices(iteration), iteration)
        folder = dist.shard_dir(self.run_dir / f"iteration_{iteration:03d}" / "collected", self.rank, self.world)
        folder = folder if self._state is not None else None  # (stored only in a run folder that setup() made)
        return collect_in_chunks(lambda prompts, chunk_seed: collect_refuel_tuples(  # (each chunk stored as it ends)
            env_id=cfg.env_id, env_kwargs=self.collect_env_kwargs, policy=self.rollout_policy(),
            sampling=self.collection_sampling, num_prompts=len(prompts), prompt_indices=prompts, seed=chunk_seed,
            kl_logprobs=self._kl_logprobs if self._env_has_kl() else None, progress=cfg.progress and self.rank == 0,
            penalties=self.penalties), folder, indices, seed, cfg.collect_chunk_prompts)

    @property
    def rollout_generator(self) -> TextGenerator:
        """The generator collection and evaluation play with: the trained module's, or its vLLM replica."""
        return self.rollout.current

    def rollout_policy(self) -> TextGenerator:
        """:attr:`rollout_generator`, holding the current weights (vLLM: woken up, the trained weights pushed)."""
        return self.rollout.ready(self.engine, self._state["global_step"] if self._state else 0)

    def _record(self, phase: str) -> None:
        """Measure what is resident on this rank now, as ``phase``'s peak if it is the largest so far."""
        asleep = self.rollout.asleep if self.rollout.replica is not None else None
        self.residency.record(phase, self.residency.measure(policy=self.model, engine=self.engine, reference=self.reference,
                                                            reward=residency.env_reward_model(self._env_config()),
                                                            replica_asleep=asleep))

    def _env_config(self) -> Any:
        kwargs = {k: v for k, v in self.env_kwargs.items() if k != "preset"}
        return make_config(self.env_kwargs.get("preset"), **kwargs)

    def _sharded_reference(self) -> bool:
        """pi_0 is a frozen module of its own (sharded under ZeRO-3), not the policy with its LoRA adapters off."""
        return self.reference is not None and not lora.is_lora(self.model)

    def _env_has_kl(self) -> bool:
        return self.penalties.kl_coef > 0  # read from the environment's configuration once, in __init__

    @torch.no_grad()
    def _kl_logprobs(self, states: list[list[dict]], responses: list[str],
                     completions: list[Any] | None = None) -> tuple[list[float], list[float]]:
        """log pi_t and log pi_0 of each response for eq. 11's KL: the sampled token ids where the policy
        reports them (as training scores them), else the text through the chat template."""
        if self.reference is None:
            raise ValueError("the environment has a KL penalty: enable reference_kl to keep the initial policy")
        rows = response_rows(self.train_tokenizer, states, responses, completions)
        kw = {"suffix": "", "batch_size": self.config.micro_batch_size * 2,
              "temperature": self.logprob_temperature, "device": self.device}
        return batched_logprobs(self.model, rows, self.pad_id, **kw), batched_logprobs(self.reference, rows, self.pad_id, **kw)

    def pair_logprobs(self, model: Any, batch_rows: list[dict], *, entropy: bool = False) -> Any:
        """log pi(y|s_h) and log pi(y'|s_h) of the rows under ``model``, [y..., y'...] (s_h once per tuple
        with ``shared_prefix``). Training and the pi_t / pi_0 scores in :meth:`prepare` both go through here,
        the same rows in the same micro-batch and layout, so the log-ratio is exactly 0 before the first update.
        """
        batch = pair_batch(batch_rows, self.pad_id, self.device, shared=self.config.shared_prefix)
        if entropy:
            return (*sequence_logprobs_and_entropy(model, batch, temperature=self.logprob_temperature), batch)
        return sequence_logprobs(model, batch, temperature=self.logprob_temperature)

    def prepare(self, rows: list[dict], iteration: int = 0) -> tuple[list[dict], int]:
        """Token ids, masks and the pi_t (and pi_0) log-probs (:meth:`score`), computed once before the updates."""
        rows, too_long = encode_tuples(rows, self.train_tokenizer, self.config.max_seq_len)
        self.score(rows, iteration, self._global_pairs(len(rows), iteration))
        return rows, too_long

    def score(self, rows: list[dict], iteration: int, global_pairs: int) -> None:
        """Add log pi_t (and log pi_0) of both responses to this rank's encoded rows, in training's micro-batches:
        each row in the micro-batch where training first meets it, on the rank that trains it there
        (:func:`distributed.scoring_batches`), so the log-ratio is exactly 0 there, as in a one-rank run on the rows
        of all ranks; the scores then go back to the rank that holds the row, which stores them.

        Phase 'scoring' (``residency.py``): the vLLM replica asleep; pi_t scored inside the policy's gather
        (ZeRO-3, W > 1), then, that released, pi_0 inside its own: at most one full copy at a time. Every rank
        takes part in both gathers, with or without rows.
        """
        models = [("logp_t", self.model)] + ([("logp_ref", self.reference)] if self.reference is not None else [])
        steps = self._steps_for(global_pairs)
        start, order, pool = self._rank_rows(iteration, rows, steps)
        pool.update({start + k: row for k, row in enumerate(rows)})  # (the same objects where it has them)
        batches = dist.scoring_batches(self._minibatch_order(iteration, global_pairs, steps, every_rank=True), order,
                                       self.rank, self.config.batch_size, self.world, self.config.micro_batch_size,
                                       range(start, start + len(rows)))
        scores: dict[int, dict[str, float]] = {}
        was_training = self.model.training
        self.model.train()  # as in training (dropout-free models: the mode changes nothing else)
        with torch.no_grad():
            for key, model in models:
                with dist.full_weights(self.engine, module=None if model is self.model else model):
                    for members, scored in tqdm(batches, desc=f"score {'pi_t' if key == 'logp_t' else 'pi_0'}",
                                                unit="batch", disable=not self._bars, leave=False):
                        logp = self.pair_logprobs(model, [pool[i] for i in members]).float().cpu().tolist()
                        for j, i in enumerate(members):
                            if i in scored:
                                scores.setdefault(i, {}).update({key: logp[j], f"{key}_prime": logp[len(members) + j]})
                    self._record("scoring")
        self.model.train(was_training)
        for part in dist.all_gather_objects(scores):  # each row's scores to the rank that holds it
            for i, values in part.items():
                if start <= i < start + len(rows):
                    rows[i - start].update(values)

    def _rank_rows(self, iteration: int, rows: list[dict], steps: int) -> tuple[int, list[int], dict[int, dict]]:
        """This rank's training rows out of all ranks' (:func:`distributed.rank_rows`). Every rank must call it."""
        return dist.rank_rows(rows, self.rank, self.world, lambda n, r: self._minibatch_order(iteration, n, steps, rank=r))

    def _global_pairs(self, pairs: int, iteration: int) -> int:
        return dist.global_pairs(pairs, self._collective_device)

    @property
    def _collective_device(self) -> torch.device:
        return self.engine.device if self.engine is not None else self.device

    def evaluate(self) -> list[dict]:
        """Play the held-out prompts at every H in 1..max_turns that each allows, with the same seeds every time
        (heldout.py)."""
        cfg = self.config
        if cfg.eval_prompts <= 0:
            return []
        self.model.eval()
        horizons, prompts = heldout.plan(self.plan.heldout(), self.max_turns, self.plan.heldout_horizons())
        start, end = dist.shard_bounds(len(horizons), self.rank, self.world)  # each rank plays its block
        policy = self.rollout_policy()
        kl = self._env_has_kl()  # (the KL penalty scores with pi_t and pi_0: both gathered, as in collection)
        with (dist.full_weights(self.engine, enabled=self.rollout_generator is self.generator or kl),
              dist.full_weights(self.engine, enabled=kl and self._sharded_reference(), module=self.reference)):
            self._record("evaluation")
            rows = play_dialogues(
                env_id=cfg.env_id, env_kwargs={**self.env_kwargs, "split": cfg.eval_split}, policy=policy,
                sampling=self.eval_sampling, num_dialogues=end - start, seed=cfg.seed + 10_000 + start,
                horizon=horizons[start:end], prompt_indices=prompts[start:end], progress=self._bars,
                kl_logprobs=self._kl_logprobs if kl else None,
            ) if end > start else []
        return [row for part in dist.all_gather_objects(rows) for row in part]

    def train_step(self, batch_rows: list[dict]) -> dict[str, float]:
        """One micro-batch: forward y and y' together, eq. 1, backward."""
        n = len(batch_rows)
        logp, entropy, batch = self.pair_logprobs(self.engine.model, batch_rows, entropy=True)
        col = lambda key: torch.tensor([r[key] for r in batch_rows], dtype=torch.float32, device=self.device)  # noqa: E731
        loss = LOSS_SCALES[self.config.loss_scale](
            logp[:n], col("logp_t"), logp[n:], col("logp_t_prime"), col("reward"), col("reward_prime"), self.config.eta)
        self.engine.backward(loss)
        out = {
            "losses/loss": loss.item(),
            "charts/sign_agreement": float(regression_sign_agreement(
                logp[:n].detach(), col("logp_t"), logp[n:].detach(), col("logp_t_prime"), col("reward"), col("reward_prime"))),
            "charts/entropy": entropy.mean().item(),
            "charts/reward_mean": float(np.mean([r["reward"] for r in batch_rows] + [r["reward_prime"] for r in batch_rows])),
            "tokens": int(batch["attention_mask"].sum()),
        }
        if self.reference is not None:
            ref = torch.cat([col("logp_ref"), col("logp_ref_prime")])
            out["charts/logratio_to_init"] = (logp.detach() - ref).mean().item()
        return out

    # -------------------------------------------------------------- the loop

    def setup(self) -> dict:
        """Create the run folder or load its latest checkpoint; returns the loop state."""
        if self._state is None:
            self._state = self._resume_or_start()
            dist.check_shared_folder(self.run_dir, self.rank, self.world)  # checkpoints need one shared folder
        return self._state

    def train(self) -> Path:
        cfg = self.config
        state = self.setup()
        logger = MetricsLogger(self.run_dir, enabled=self.engine.is_main, resume_step=state["global_step"] if cfg.resume else None,
                               report_to=cfg.report_to)
        summary = state.setdefault("summary", [])
        if not summary and cfg.eval_prompts > 0:
            self.plan.heldout()  # a bad eval_prompts fails before anything is played
            summary.append(heldout.record(0, self.evaluate(), self.max_turns))
        for t in range(state["iteration"], self.iterations):
            self._collected = None
            rows = self._iteration_data(t, logger, state)
            self.rollout.sleep()
            steps_per_iter = self._steps_for(self._global_pairs(len(rows), t))
            _, order, batch_rows = self._rank_rows(t, rows, steps_per_iter)  # the same count on every rank
            if steps_per_iter:
                self._plan_schedule(t, steps_per_iter, state)
            self.engine.model.train()  # collection and evaluation left it in eval mode
            bar = tqdm(total=steps_per_iter, initial=state["step_in_iteration"], desc=f"[{t + 1}/{self.iterations}] train",
                       unit="step", disable=not self._bars, leave=False)
            for step_in_iter in range(state["step_in_iteration"], steps_per_iter):
                start_time = time.perf_counter()
                per = self.rank_batch_size
                idx = order[step_in_iter * per : (step_in_iter + 1) * per]
                metrics: list[dict[str, float]] = []
                info: dict[str, float] = {}
                for m in range(0, len(idx), cfg.micro_batch_size):
                    metrics.append(self.train_step([batch_rows[i] for i in idx[m : m + cfg.micro_batch_size]]))
                    self._record("training")  # (after a backward: gradients and, after the first update, AdamW's state)
                    info = self.engine.step() or info  # updates at the accumulation boundary
                state["global_step"] += 1
                state["step_in_iteration"] = step_in_iter + 1
                tokens = sum(x.pop("tokens") for x in metrics)
                logged = self.engine.all_reduce_means({k: float(np.mean([x[k] for x in metrics])) for k in metrics[0]})
                logged.update({"charts/lr": info.get("lr", math.nan), "charts/grad_norm": info.get("grad_norm", math.nan),
                               "charts/tokens_per_s": tokens / (time.perf_counter() - start_time), "charts/iteration": t})
                logger.log(state["global_step"], logged, echo=not self._bars)
                bar.update(1)
                bar.set_postfix(loss=f"{logged['losses/loss']:.4g}")
                if cfg.save_every and state["global_step"] % cfg.save_every == 0 and state["step_in_iteration"] < steps_per_iter:
                    self._checkpoint(state)
            bar.close()
            state["iteration"], state["step_in_iteration"] = t + 1, 0
            due = (t + 1) % cfg.eval_every == 0 or t + 1 == self.iterations
            summary.append(heldout.record(t + 1, self.evaluate() if due else [], self.max_turns, self._collected or rows))
            self._checkpoint(state)
            if self.engine.is_main:
                print(format_summary(summary, self.max_turns), flush=True)
                if cfg.eval_prompts and due and t + 1 < self.iterations:  # (the last one is printed by _finish)
                    print(heldout.improvement_line(heldout.paired_change(summary[0], summary[-1], cfg.seed)), flush=True)
        logger.close()
        return self._finish(summary)

    def _steps_for(self, pairs: int) -> int:
        """Optimizer steps of an iteration that kept ``pairs`` pairs on all ranks: ``epochs`` passes over
        them (at least one step), the same epochs for every method and the same steps on every rank."""
        return max(1, self.config.epochs * pairs // self.config.batch_size) if pairs else 0

    def _planned_steps(self) -> int:
        """The schedule's length before any data exists: every configured prompt kept."""
        return self._steps_for(self.config.prompts_per_iteration or self.plan.train_items)

    def _plan_schedule(self, iteration: int, steps: int, state: dict) -> None:
        """Point the learning-rate schedule at this iteration's steps (``schedule_scope``).

        'run': iteration t is the t-th of T equal parts of one warm-up + decay. 'iteration': the
        iteration has its own warm-up + decay, and AdamW's state restarts at its first step.
        """
        first = state["global_step"] - state["step_in_iteration"]
        if self.config.schedule_scope == "iteration":
            self.engine.set_schedule(first, 0, steps)
            if state["step_in_iteration"] == 0:
                self.engine.reset_optimizer_state()
        else:
            self.engine.set_schedule(first, iteration * steps, self.iterations * steps)

    def _minibatch_order(self, iteration: int, n: int, steps: int | None = None, rank: int | None = None, *,
                         every_rank: bool = False) -> list[int]:
        """Rank ``rank``'s rows (default: this rank's) for ``steps`` updates (default: those of ``n`` rows), as indices
        into the ``n`` rows of all ranks: its slice of each update of one order over all of them, drawn as one rank
        draws it (:func:`distributed.global_order`, :func:`distributed.rank_slices`), or with ``every_rank`` the
        whole order. Each row is used as often as in a one-rank run, and every rank trains on as many rows."""
        order = dist.global_order(self.config.seed, iteration, n, self._steps_for(n) if steps is None else steps,
                                  self.config.batch_size)
        return order if every_rank else dist.rank_slices(order, self.config.batch_size,
                                                         self.rank if rank is None else rank, self.world)

    def _iteration_data(self, t: int, logger: MetricsLogger, state: dict) -> list[dict]:
        """This rank's tuples of iteration t: from disk when a resumed run collected them already.

        With W ranks each rank collects, scores and stores its own shard (``iteration_<t>/tuples/rank_<r>-of-<W>``,
        maybe empty); a shard missing on any rank (a kill between two ranks' writes) makes every rank collect
        its shard again, before any update used them. Training shares all ranks' rows out evenly (:meth:`_rank_rows`).
        """
        folder = self.run_dir / f"iteration_{t:03d}"
        mine = dist.shard_dir(folder / "tuples", self.rank, self.world)
        if not dist.all_max(0 if mine.exists() else 1, self._collective_device):
            rows = dist.load_tuples(mine).to_list()
            self._collected = [r for part in dist.all_gather_objects([light_row(r) for r in rows]) for r in part]
            return rows
        self.rollout_policy()  # (vLLM: wake the replica and push the weights, outside any full gather)
        kl = self._env_has_kl()  # (pi_t and pi_0 forwards during collection: both gathered)
        with (dist.full_weights(self.engine, enabled=self.rollout_generator is self.generator or kl),
              dist.full_weights(self.engine, enabled=kl and self._sharded_reference(), module=self.reference)):
            rows, stats = self.collect(t)
            self._record("collection")
        self.generator.clear_kv_cache()  # the KV kept between generation calls is of no use to training
        self.rollout.sleep()  # the replica sleeps before scoring
        rows, too_long = self.prepare(rows, t)
        rows = [{**r, "rank": self.rank} for r in rows]
        parts = dist.all_gather_objects((stats, too_long, [light_row(r) for r in rows], sorted({k for r in rows for k in r})))
        stats, too_long = dist.merge_stats([p[0] for p in parts]), sum(p[1] for p in parts)
        light = [r for p in parts for r in p[2]]
        if not light and not getattr(stats, "dropped_ties", 0):  # (DPO: an iteration of ties just makes no update)
            raise RuntimeError(
                f"iteration {t}: no usable tuple ({stats.dropped_truncated} truncated, {too_long} longer than "
                f"max_seq_len={self.config.max_seq_len}); raise the limits or shorten the responses"
            )
        if rows:
            store_rows(rows, [k for p in parts for k in p[3]], mine)
        elif light:  # (an empty Dataset does not load back; an iteration without pairs is simply collected again)
            dist.store_empty_shard(mine)
        if self.engine.is_main:
            record = {**stats.as_dict(), "too_long": too_long}
            if self.world > 1:
                record["ranks"] = [{**p[0].as_dict(), "too_long": p[1]} for p in parts]
            ckpt.write_json_atomic(folder / "collection.json", record)
        logger.log(state["global_step"], collection_metrics(light, stats, too_long, self.max_turns))
        self._collected = light  # the summary's "collected" table covers every rank's tuples
        return dist.load_tuples(mine).to_list() if rows else rows

    def _resume_or_start(self) -> dict:
        """The loop state: the latest checkpoint's with --resume, or a new run's.

        A run folder without a checkpoint yet (stopped in its first iteration, or by an error
        before its first checkpoint was complete) resumes from the start, with the initial weights;
        the tuples it stored are used, not collected again.
        """
        cfg = self.config
        total_steps = self.iterations * self._planned_steps()
        optim = OptimConfig(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                            warmup_ratio=cfg.warmup_ratio, schedule=cfg.lr_schedule, max_grad_norm=cfg.max_grad_norm,
                            grad_accum_steps=self.rank_batch_size // cfg.micro_batch_size)
        latest, state = None, {"iteration": 0, "step_in_iteration": 0, "global_step": 0}
        if cfg.resume:  # (ZeRO-3 shards: the engine's checkpoint restores the weights, not model/)
            latest, state = ckpt.resume_point(self.run_dir, ckpt.run_record(self.agent, self.mode, cfg), state,
                                              None if residency.is_sharded(self.model) else self.model,
                                              lambda folder: dist.shard_dir(folder, self.rank, self.world))
        self.engine = TrainEngine(self.model, optim, total_steps, deepspeed_config=cfg.deepspeed,
                                  gradient_checkpointing=cfg.gradient_checkpointing, last_k_layers=cfg.last_k_layers,
                                  micro_batch_size=2 * cfg.micro_batch_size, device=None if cfg.deepspeed else self.device)
        if self.reference is not None and not lora.is_lora(self.model):  # (LoRA: pi_0 is the trained module itself)
            self.reference = self.engine.match_precision(self.reference)
        if cfg.policy_backend == "vllm" and self.world > 1:
            # after DeepSpeed has set up the process group that the external launcher joins
            self.rollout.start_replica()
        if cfg.resume:
            if self.engine.is_main:
                ckpt.remove_partial_writes(self.run_dir)
            self.engine.barrier()
            if latest is None:
                print(f"resuming {self.run_dir} from its start (it has no checkpoint yet); tuples it stored are "
                      "used, not collected again", flush=True)
                return state
            ckpt.load_engine(self.engine, latest)
            ckpt.set_rng_states(state.pop("rng"))
            print(f"resuming {self.run_dir} at iteration {state['iteration']}, step {state['global_step']}", flush=True)
            return state
        ckpt.start_run(self.run_dir, {"agent": self.agent, "mode": self.mode, **asdict(cfg)}, self.engine)
        return state

    def _checkpoint(self, state: dict) -> None:
        name = f"step_{state['global_step']:07d}"
        ckpt.save_checkpoint(self.run_dir, name, model=self.model, engine=self.engine, state=state,
                             keep=self.config.keep_checkpoints)

    def _finish(self, summary: list[dict]) -> Path:
        final = self.run_dir / "final_model"
        step = self._state["global_step"]
        weights = self.engine.unwrapped_model_state()  # every rank: ZeRO-3 gathers the shards
        if self.engine.is_main:
            ckpt.save_final_model(final, self.model, weights, self.tokenizer, ckpt.latest_checkpoint(self.run_dir), step)
            report_run(self.run_dir, final, summary, self.max_turns, self.config.seed, self.config.report_to)
        return final
