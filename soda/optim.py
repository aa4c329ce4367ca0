"""SODA's optimiser and schedule: AdamW with optional "cautious" masking, and warmup-stable-decay.

Cautious masking (Liang et al., 2024) zeroes the update where it disagrees in sign with the
current gradient and rescales the rest so the update's mean size is kept. Weight decay is
decoupled and multiplied by the scheduled LR, as in `torch.optim.AdamW` and optax's adamw, so
it follows the schedule down to zero.
"""

from __future__ import annotations

import math

import torch


class CautiousAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas=(0.98, 0.98), eps: float = 1e-16, weight_decay: float = 0.0,
                 cautious: bool = True):
        if lr < 0 or eps < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, cautious=cautious))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                if wd:
                    p.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - b1)
                exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
                update = exp_avg / denom / (1 - b1**t)
                if group["cautious"]:
                    mask = (update * grad > 0).to(update.dtype)
                    update.mul_(mask / mask.mean().clamp_(min=1e-3))
                p.add_(update, alpha=-lr)
        return loss


def wsd_factor(step: int, total: int, warmup: float, decay: float) -> float:
    """Warmup-stable-decay: linear warm-up over `warmup`*total steps, flat, linear to 0 over the last `decay`."""
    w = round(warmup * total)
    d = round(decay * total)
    if step < w:
        return (step + 1) / w
    if step >= total - d:
        return max(0.0, (total - step) / d) if d else 0.0
    return 1.0


def cosine_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over `warmup`*total steps, then a half cosine from 1 to 0 at the last step (fine-tuning)."""
    w = round(warmup * total)
    if step < w:
        return (step + 1) / w
    progress = (step - w) / max(1, total - w)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_factor(schedule: str, step: int, total: int, warmup: float, decay: float) -> float:
    """The LR multiplier of `schedule` ("wsd" or "cosine") at `step`."""
    if schedule == "cosine":
        return cosine_factor(step, total, warmup)
    return wsd_factor(step, total, warmup, decay)


def schedule_phases(total: int, warmup: float, decay: float, schedule: str = "wsd") -> dict[str, int]:
    w = round(warmup * total)
    if schedule == "cosine":
        return {"warmup": w, "stable": 0, "decay": total - w}
    d = round(decay * total)
    return {"warmup": w, "stable": total - w - d, "decay": d}


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay matrices; not norms, biases or the input embedding (by name, so FSDP's flat views work too)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = "norm" in name or name.endswith(".bias") or "embed_tokens" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
