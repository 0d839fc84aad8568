"""The trainer: one optimizer step of LoRA training on judged turns (learner -> trainer).

Each `TrainItem` is a recorded turn exactly as vLLM produced it (prompt ids, completion
ids, the sampler's logprobs) with its signals: the judge's reward and/or the teacher's
logprobs under a hindsight hint. Nothing is re-tokenized. A turn with images (a GUI
agent's screenshots) trains a vision-language base model: its recorded prompt ids (each
image already expanded into its placeholder tokens) go in unchanged beside the image
processor's pixel inputs for the same images (`multimodal`), LoRA on the language model
only. A step:

1. recompute π_old, the current weights' logprobs of every completion token;
2. turn the signals into per-token advantages (binary, opd or combined);
3. make ``passes`` optimizer passes over the batch with the clipped surrogate, in
   micro-batches bounded by a token budget (gradients accumulate across them);
4. measure how far the policy moved (KL on the batch), for the publish gate.

Several processes (``torchrun --nproc-per-node N``, gloo on CPU, NCCL on GPUs; see
`ranks` for how the learner drives them): each rank takes every N-th turn of the same
batch and weighs its loss by its share of the WHOLE batch's tokens, so summing the ranks'
LoRA gradients gives exactly the single-process gradient, and every rank takes the same
optimizer step. Without ``shard`` each rank holds the whole model and the gradients are
summed by one all-reduce per pass (DDP's scheme); with it, FSDP holds 1/N of every weight
on each rank (`sharding`) and sums the gradients as it goes.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nextstate.learner import sharding
from nextstate.learner.config import TrainerConfig
from nextstate.learner.items import TrainItem, microbatches, rank_microbatches
from nextstate.learner.losses import (
    binary_advantages,
    clipped_surrogate,
    combined_advantages,
    kl_to_reference,
    opd_advantages,
)
from nextstate.learner.multimodal import (
    LANGUAGE_LORA_TARGETS,
    decode_image,
    image_token_id,
    pixel_inputs,
)


@dataclass
class StepStats:
    turns: int = 0
    tokens: int = 0
    loss: float = 0.0
    clip_fraction: float = 0.0
    advantage_mean: float = 0.0
    reward_mean: float | None = None
    kl: float = 0.0  # KL(π_before ‖ π_after) on the batch's tokens
    importance_weight: float = 1.0
    tokens_per_second: float = 0.0
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    def __init__(self, base_model: Path, config: TrainerConfig = TrainerConfig(),
                 resume_from: Path | None = None, device: torch.device | None = None) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

        torch.manual_seed(config.seed)
        self.config = config
        self.device = device or pick_device()
        self.sharded = config.shard and _rank_and_world()[1] > 1
        self._marks: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        # A vision-language model reads its images through its processor; LoRA goes on its
        # language model only (the vision tower and connector stay frozen, as vLLM serves).
        self.vision = image_token_id(base_model) is not None
        self.processor = AutoProcessor.from_pretrained(base_model) if self.vision else None
        model = (AutoModelForImageTextToText if self.vision else AutoModelForCausalLM
                 ).from_pretrained(base_model, dtype=dtype)
        n_params = sum(p.numel() for p in model.parameters())
        if self.device.type == "cuda" and n_params > 1e9:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        if resume_from is not None:
            self.model = PeftModel.from_pretrained(model, resume_from, is_trainable=True)
        elif self.vision:
            self.model = get_peft_model(model, LoraConfig(
                r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                target_modules=LANGUAGE_LORA_TARGETS))
        else:
            targets = [t for t in config.target_modules
                       if any(name.endswith(t) for name, _ in model.named_modules())]
            self.model = get_peft_model(model, LoraConfig(
                r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                target_modules=targets, task_type="CAUSAL_LM"))
        if self.sharded:  # still on the CPU: each rank moves only its shard to the GPU
            sharding.shard(self.model, self.device)
        else:
            self.model.to(self.device)
        lr = config.learning_rate or (1e-3 if n_params < 1e8 else 2e-5)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        if resume_from is not None and (resume_from / "optimizer.pt").exists():
            self._load_optimizer(resume_from / "optimizer.pt")

    # -- the step ---------------------------------------------------------------------------

    def step(self, items: Sequence[TrainItem], lr_scale: float = 1.0) -> StepStats:
        """One optimizer step on ``items``; ``lr_scale`` multiplies the learning rate for
        this step only (the publish gate's retry at a smaller step)."""
        rates = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * lr_scale
        try:
            stats = self._step(items)
        finally:
            for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
                group["lr"] = rate
        stats.extra["lr_scale"] = lr_scale
        return stats

    def _step(self, items: Sequence[TrainItem]) -> StepStats:
        start = time.monotonic()
        cfg = self.config
        rank, world = _rank_and_world()
        self.model.train()
        # Every rank scores the whole batch (cheap, no gradient) so that advantages and
        # statistics need no communication; only the gradient work is split.
        old = self.logprobs(items)  # π_old: the weights as the step starts
        ref = self._reference_logprobs(items) if cfg.kl_coef else None
        advantages = [self._advantages(item, old_t) for item, old_t in zip(items, old,
                                                                            strict=True)]
        total_tokens = sum(len(item.completion_ids) for item in items)
        groups = rank_microbatches(items, rank, world,
                                   self.config.max_tokens_per_microbatch, self.sharded)
        # FSDP averages the ranks' gradients; the shares below are made to be summed.
        scale = world if self.sharded else 1
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        stats: list[tuple[float, Any]] = []
        for _ in range(cfg.passes):
            self.optimizer.zero_grad(set_to_none=True)
            for group in groups:
                # An empty group keeps a sharded rank in step with the others (every
                # forward and backward is collective): it runs, and counts for nothing.
                batch = group or [0]
                logp_B_T, mask_B_T = self._forward([items[i] for i in batch])
                old_B_T = _pad([old[i] for i in batch], mask_B_T)
                adv_B_T = _pad([advantages[i] for i in batch], mask_B_T)
                sampler_B_T = _pad([old[i] if items[i].context  # weight 1, see TrainItem
                                    else torch.tensor(items[i].sampler_logprobs)
                                    for i in batch], mask_B_T)
                loss, s = clipped_surrogate(
                    logp_B_T, old_B_T, adv_B_T, mask_B_T, sampler_B_T,
                    eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                    importance_cap=cfg.importance_cap)
                if ref is not None:
                    loss = loss + cfg.kl_coef * kl_to_reference(
                        logp_B_T, _pad([ref[i] for i in batch], mask_B_T), mask_B_T)
                share = float(mask_B_T.sum()) / total_tokens if group else 0.0
                (loss * share * scale).backward()
                if group:
                    stats.append((share, s))
            if world > 1 and not self.sharded:
                _sum_gradients(trainable)
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            self.optimizer.step()
        new = self.logprobs(items)
        return self._summary(items, old, new, advantages, stats, total_tokens, start)

    def _advantages(self, item: TrainItem, old_T: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        mask_1_T = torch.ones(1, len(old_T))
        old_1_T = old_T[None]
        reward_1 = torch.tensor([item.reward or 0.0])
        teacher_1_T = (torch.tensor(item.teacher_logprobs)[None]
                       if item.teacher_logprobs is not None else old_1_T)
        if cfg.method == "binary":
            adv = binary_advantages(reward_1, mask_1_T)
        elif cfg.method == "opd":
            adv = opd_advantages(teacher_1_T, old_1_T, mask_1_T, cfg.opd_clip)
        else:
            adv = combined_advantages(
                teacher_1_T, old_1_T, reward_1,
                has_teacher_B=torch.tensor([float(item.teacher_logprobs is not None)]),
                has_reward_B=torch.tensor([float(item.reward is not None)]),
                mask_B_T=mask_1_T, w_opd=cfg.w_opd, w_rl=cfg.w_rl, clip=cfg.opd_clip)
        return adv[0] * item.weight

    # -- logprobs -----------------------------------------------------------------------------

    @torch.no_grad()
    def logprobs(self, items: Sequence[TrainItem]) -> list[torch.Tensor]:
        """Per-token logprobs of each item's completion under the current weights."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(items)
        for batch in microbatches(items, self.config.max_tokens_per_microbatch):
            logp_B_T, mask_B_T = self._forward([items[i] for i in batch])
            for row, i in enumerate(batch):
                out[i] = logp_B_T[row, : int(mask_B_T[row].sum())].float().cpu()
        return out

    @torch.no_grad()
    def _reference_logprobs(self, items: Sequence[TrainItem]) -> list[torch.Tensor]:
        with self.model.disable_adapter():
            return self.logprobs(items)

    def _forward(self, items: Sequence[TrainItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded forward pass; returns completion logprobs [B, T] and their mask."""
        seqs = [item.prompt_ids + item.completion_ids for item in items]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attention = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
        logits = self.model(input_ids=ids.to(self.device),
                            attention_mask=attention.to(self.device),
                            **self._pixels(items)).logits.float()
        t_max = max(len(item.completion_ids) for item in items)
        logp_B_T = torch.zeros(len(items), t_max, device=self.device)
        mask_B_T = torch.zeros(len(items), t_max, device=self.device)
        for row, item in enumerate(items):
            p, t = len(item.prompt_ids), len(item.completion_ids)
            # logits at position i predict token i + 1
            row_logp = torch.log_softmax(logits[row, p - 1 : p + t - 1], dim=-1)
            target = torch.tensor(item.completion_ids, device=self.device)
            logp_B_T[row, :t] = row_logp.gather(-1, target[:, None])[:, 0]
            mask_B_T[row, :t] = 1.0
        return logp_B_T, mask_B_T

    def _pixels(self, items: Sequence[TrainItem]) -> dict[str, torch.Tensor]:
        """The image processor's inputs for a micro-batch's images: one item with images
        goes alone (see `microbatches`). Computed at each pass rather than kept for the
        step: a 30-screen turn's pixels are 36 MiB on the VLM toy's 112-pixel tiles (ten
        times that with 364-pixel ones), a batch of 16 such turns 16 times that, while
        the processor takes 0.3 s for them (docs/vlm-on-cpu.md)."""
        with_images = [item for item in items if item.images]
        if not with_images:
            return {}
        if self.processor is None:
            raise ValueError(f"turn {with_images[0].turn_id} has images, and the base model "
                             "reads text only: train a vision-language model on image turns")
        assert len(items) == 1, "an item with images goes alone in its micro-batch"
        images = [decode_image(url) for url in items[0].images]
        return {k: v.to(self.device) for k, v in pixel_inputs(self.processor, images).items()}

    def _summary(self, items: Sequence[TrainItem], old: list[torch.Tensor],
                 new: list[torch.Tensor], advantages: list[torch.Tensor],
                 stats: list[tuple[float, Any]], total_tokens: int, start: float) -> StepStats:
        passes = max(1, self.config.passes)
        mask = torch.ones(1, total_tokens)
        old_all, new_all = torch.cat(old)[None], torch.cat(new)[None]
        rewards = [item.reward for item in items if item.reward is not None]
        # Token-weighted sums over this rank's micro-batches; over all ranks' when several.
        sums_3 = torch.tensor([[share * s.loss, share * s.clip_fraction,
                                share * s.importance_weight] for share, s in stats]
                              ).reshape(-1, 3).sum(0, dtype=torch.float64)
        if _rank_and_world()[1] > 1:
            sums_3 = sums_3.to(self.device)
            torch.distributed.all_reduce(sums_3)
        loss, clip_fraction, importance_weight = (sums_3.cpu() / passes).tolist()
        seconds = time.monotonic() - start
        return StepStats(
            turns=len(items), tokens=total_tokens, loss=loss, clip_fraction=clip_fraction,
            advantage_mean=float(torch.cat(advantages).mean()),
            reward_mean=sum(rewards) / len(rewards) if rewards else None,
            kl=float(kl_to_reference(new_all, old_all, mask)),
            importance_weight=importance_weight,
            tokens_per_second=total_tokens * (passes + 2) / max(seconds, 1e-9),
            seconds=seconds,
            # For the publish gate's record: `kl` grows as e^Δ when a sampled token falls
            # by Δ nats (it estimates KL(after ‖ before) from tokens sampled before); the
            # same samples' estimate of KL(before ‖ after) grows as Δ, and the largest fall.
            extra={"kl_before_after": float(kl_to_reference(old_all, new_all, mask)),
                   "largest_fall": float((old_all - new_all).max())},
        )

    # -- saving and restoring -------------------------------------------------------------------

    def save(self, directory: Path, stats: StepStats | None = None) -> Path:
        """The adapter (peft format, loadable by vLLM) plus the optimizer state to resume.
        Every rank calls it (sharded, each holds a part of the weights); rank 0 writes."""
        weights = self.full_lora()
        optimizer = sharding.full_optimizer_state(self.optimizer)
        rank, world = _rank_and_world()
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(directory, state_dict=weights)
            torch.save(optimizer, directory / "optimizer.pt")
            if stats is not None:
                (directory / "step.json").write_text(json.dumps(asdict(stats)))
        if world > 1:
            torch.distributed.barrier()  # written, before any rank may `load` it
        return directory

    def load(self, directory: Path) -> None:
        """Put an adapter written by `save` into this trainer: its weights, and its
        optimizer state (a fresh one if it has none). One trainer can so train many
        adapters in turn (personal adapters) with one copy of the base model."""
        from safetensors.torch import load_file

        saved = json.loads((directory / "adapter_config.json").read_text())
        if saved.get("r") != self.config.lora_rank:
            raise ValueError(f"{directory.name} has LoRA rank {saved.get('r')}, the trainer "
                             f"{self.config.lora_rank}: train a new policy or set the rank")
        try:
            sharding.set_lora(self.model, load_file(directory / "adapter_model.safetensors"))
        except ValueError as exc:
            raise ValueError(f"{directory.name} does not fit the trainer's adapter: {exc}") \
                from exc
        state = directory / "optimizer.pt"
        if state.exists():
            self._load_optimizer(state)
        else:
            self.optimizer.state.clear()

    def _load_optimizer(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu")
        self.optimizer.load_state_dict(sharding.local_optimizer_state(self.optimizer, state))

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The trainable weights and optimizer state (this rank's part), to undo a step."""
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()
                   if "lora_" in k}
        return weights, copy.deepcopy(self.optimizer.state_dict())

    def restore(self, snapshot: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> None:
        weights, optimizer = snapshot
        self.model.load_state_dict(weights, strict=False)
        self.optimizer.load_state_dict(optimizer)

    def full_lora(self) -> dict[str, torch.Tensor]:
        """The adapter's weights, whole (gathered from every rank when sharded)."""
        return sharding.full_lora(self.model)

    def mark(self, name: str) -> None:
        """`snapshot` kept under a name, so that a caller on another rank can say which
        state to go back to (`rewind`) without holding the tensors itself."""
        self._marks[name] = self.snapshot()

    def rewind(self, name: str) -> None:
        self.restore(self._marks[name])


def _rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Add up the ranks' gradients (each is already weighted by its share of the batch)."""
    for param in params:
        if param.grad is None:  # a rank whose shard never reached this parameter
            param.grad = torch.zeros_like(param)
        torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.SUM)


def _pad(rows: Sequence[torch.Tensor], like_B_T: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like_B_T)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row.to(like_B_T.device)
    return out

