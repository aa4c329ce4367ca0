"""SODA's optimiser and schedule: AdamW with optional "cautious" masking, and warmup-stable-decay.

Cautious masking (Liang et al., 2024) zeroes the update where it disagrees in sign with the
current gradient and rescales the rest so the update's mean size is kept.

Weight decay is decoupled. SODA's (Levanter's `adamc_weight_decay`, Defazio 2025: "AdamC") scales
the decay coefficient with the schedule, wd_t = wd * lr_t / lr_peak, so each step shrinks the
weights by lr_t * wd_t = wd * lr_t^2 / lr_peak: the ratio of decay to LR stays constant. Plain
decoupled AdamW (`torch.optim.AdamW`, optax's adamw) shrinks by lr_t * wd, twice as strongly at
half the peak LR; it is kept as `weight_decay_mode="adamw"`.
"""

from __future__ import annotations

import math

import torch

from soda.train.config import WEIGHT_DECAY_MODES


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor: one rank's shard of a parameter or gradient (FSDP2)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's part of each tensor (DTensors' local shards, in place-updatable views; others as they are)."""
    return [t.to_local() if is_sharded(t) else t for t in tensors]


# What each trained parameter holds for the whole run: its fp32 weight and gradient and AdamW's two fp32 moments.
STATE_BYTES_PER_PARAMETER = 4 + 4 + 2 * 4


class CautiousAdamW(torch.optim.Optimizer):
    """AdamW with cautious masking and AdamC or plain decoupled weight decay (see the module docstring).

    `lr` is the peak LR: a scheduler (LambdaLR) scales each group's "lr" from it, and AdamC divides by
    the group's "peak_lr", which stays the constructor's `lr` unless a group gives its own.
    """

    def __init__(self, params, lr: float, betas=(0.98, 0.98), eps: float = 1e-16, weight_decay: float = 0.0,
                 cautious: bool = True, weight_decay_mode: str = "adamc"):
        if lr < 0 or eps < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps}")
        if weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode {weight_decay_mode!r}: choose {' or '.join(WEIGHT_DECAY_MODES)}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, cautious=cautious,
                                      weight_decay_mode=weight_decay_mode, peak_lr=lr))

    @staticmethod
    def decay_factor(group: dict) -> float:
        """What this step multiplies the group's weights by: 1 - lr_t * wd (adamw) or 1 - lr_t * wd * lr_t / lr_peak
        (adamc). Groups saved before the mode existed decayed as adamw, and keep doing so."""
        lr, wd = group["lr"], group["weight_decay"]
        if group.get("weight_decay_mode", "adamw") == "adamc":
            peak = group.get("peak_lr") or group.get("initial_lr") or lr
            wd = wd * lr / peak if peak else 0.0
        return 1 - lr * wd

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient, with torch's multi-tensor (`_foreach_`) kernels: a few
        launches per parameter group instead of a dozen per parameter (hundreds of small kernels on a GPU)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1  # a CPU scalar: reading it never waits for the GPU
            t = [s["step"].item() for s in states]
            sharded = is_sharded(params[0])  # FSDP2: update the local shards; the states stay DTensors
            numels = [p.numel() for p in params]  # of the whole parameter
            params, grads = local_tensors(params), local_tensors(grads)
            exp_avg = local_tensors([s["exp_avg"] for s in states])
            exp_avg_sq = local_tensors([s["exp_avg_sq"] for s in states])
            if wd:
                torch._foreach_mul_(params, self.decay_factor(group))
            torch._foreach_lerp_(exp_avg, grads, 1 - b1)
            torch._foreach_mul_(exp_avg_sq, b2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - b2)
            denom = torch._foreach_sqrt(exp_avg_sq)
            torch._foreach_div_(denom, [math.sqrt(1 - b2**k) for k in t])
            torch._foreach_add_(denom, eps)
            update = torch._foreach_div(exp_avg, denom)
            torch._foreach_div_(update, [1 - b1**k for k in t])
            if group["cautious"]:
                # keep the coordinates where update and gradient agree in sign, rescaled by 1 / the kept fraction
                mask = torch._foreach_mul(update, grads)
                torch._foreach_sign_(mask)
                torch._foreach_clamp_min_(mask, 0.0)
                kept = torch.stack(torch._foreach_norm(mask, 1))  # coordinates kept, per parameter
                if sharded:  # counted over every shard: the fraction is the whole parameter's, as unsharded
                    torch.distributed.all_reduce(kept)
                kept /= torch.tensor(numels, dtype=kept.dtype, device=kept.device)
                torch._foreach_mul_(mask, list(1 / kept.clamp_(min=1e-3)))
                torch._foreach_mul_(update, mask)
            torch._foreach_add_(params, update, alpha=-lr)
        return loss


def clip_by_global_norm(grads: list[torch.Tensor], max_norm: float | None, all_reduce=None) -> torch.Tensor:
    """The global L2 norm of `grads` (summed over ranks by `all_reduce` when they are shards), then, with a
    `max_norm`, the gradients scaled as `torch.nn.utils.clip_grad_norm_` scales them: by
    min(1, max_norm / (norm + 1e-6)). Multi-tensor kernels: a handful of launches, not several per gradient."""
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

    if grads[0].device.type in _get_foreach_kernels_supported_devices():  # GPUs: one fused, tree-reduced kernel
        squares = torch.stack(torch._foreach_norm(grads)).float().square().sum()
    else:  # the CPU's norm kernels sum naively in fp32 (5e-5 off at 4M elements); torch.sum does not
        squares = torch.stack([g.float().square().sum() for g in grads]).sum()
    if all_reduce is not None:
        all_reduce(squares)
    norm = squares.sqrt()
    if max_norm:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0).to(grads[0].dtype))
    return norm


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
