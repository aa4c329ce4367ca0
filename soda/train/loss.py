"""The training loss without materialising [batch, seq, vocab] logits.

SODA's vocabulary has 144,644 ids, so the logits of one 8 x 4096 micro-batch are 19 GB in fp32
(and the same again for their gradient): at 135m the LM head's memory traffic would cost more
than its matrix products. `chunked_lm_loss` runs the head over chunks of tokens and, when
gradients are needed, computes each chunk's gradient with respect to the hidden states and the
head weight in the same pass (the approach of Liger's fused linear cross-entropy), so only one
chunk's logits ever exist. It returns exactly what the full-logits path computes: the loss
(mean NLL plus z-loss over the scored tokens) and the per-token NLL and log-sum-exp for metrics.

`compiled=True` (`--compile`) runs the per-chunk arithmetic through torch.compile: one fused
reduction and one fused elementwise kernel instead of several passes over the chunk.

`lm_loss` is the training loss of a whole model and batch: next-token NLL plus z-loss, never scoring
a target across a document boundary (the first token of a document, predicted from the previous one).
"""

from __future__ import annotations

import torch

from soda.model import attention_inputs

CHUNK_ELEMENTS = 2**27  # logits per chunk (512 MiB in fp32): chunk rows = this // vocabulary size


def log_sum_exp_and_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-sum-exp and next-token NLL of `logits` [..., V] for `targets` [...], in fp32."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    return lse, lse - x.gather(-1, targets[..., None]).squeeze(-1)


def chunk_terms(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, z_loss: float):
    """log-sum-exp, NLL and d/dlogits of sum_i w_i (NLL_i + z lse_i^2) for one chunk ([c, V] logits).

    The arithmetic is in fp32 whatever the logits' dtype; the gradient comes back in that dtype.
    """
    x = logits.float()
    lse, nll = log_sum_exp_and_nll(x, targets)
    scale = (weights * (1 + 2 * z_loss * lse))[:, None]
    ids = torch.arange(x.shape[-1], device=x.device)[None, :]
    grad = torch.exp(x - lse[:, None]) * scale - torch.where(ids == targets[:, None], weights[:, None], 0.0)
    return lse, nll, grad.to(logits.dtype)


_compiled_terms = None


def compiled_chunk_terms():
    """`chunk_terms` through torch.compile (fused kernels), made once per process and compiled on first use."""
    global _compiled_terms
    if _compiled_terms is None:
        _compiled_terms = torch.compile(chunk_terms, dynamic=False)
    return _compiled_terms


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = sum_i w_i (NLL_i + z lse_i^2) of logits = hidden @ weight.T, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, z_loss: float, chunk: int, grad_enabled: bool, terms):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        need_hidden, need_weight = (grad_enabled and ctx.needs_input_grad[i] for i in (0, 1))  # grad mode is off here
        n = hidden.shape[0]
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(nll)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        w = weight.to(dtype)
        with torch.autocast(device, enabled=False):  # the dtypes are chosen here, as autocast would
            for start in range(0, n, chunk):
                end = min(n, start + chunk)
                h, t = hidden[start:end].to(dtype), targets[start:end]
                logits = h @ w.T
                if not (need_hidden or need_weight):
                    lse[start:end], nll[start:end] = log_sum_exp_and_nll(logits, t)
                    continue
                lse[start:end], nll[start:end], g = terms(logits, t, weights[start:end], z_loss)
                if need_hidden:
                    grad_hidden[start:end] = g @ w
                if need_weight:
                    grad_weight += (g.T @ h).float()
        loss = (weights * (nll + z_loss * lse.square())).sum()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(nll, lse)
        return loss, nll, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll, _grad_lse):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                    z_loss: float, chunk: int | None = None, compiled: bool = False,
                    token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, per-token NLL and log-sum-exp of `hidden` [..., D] through the head `weight` [V, D].

    The loss is the mean NLL over the `valid` positions plus `z_loss` times their mean squared
    log-sum-exp (with `token_weights`, in `targets`' shape: the weighted mean, sum w (nll + z lse^2) / sum w);
    NLL and log-sum-exp come back in `targets`' shape (detached).
    """
    terms = compiled_chunk_terms() if compiled else chunk_terms
    shape = targets.shape
    weights = valid.reshape(-1).float()
    if token_weights is not None:
        weights = weights * token_weights.reshape(-1).float()
    weights = weights / weights.sum().clamp(min=1e-12)  # nothing scored: all weights 0, the loss 0
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    loss, nll, lse = _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                               weights, float(z_loss), chunk, torch.is_grad_enabled(), terms)
    return loss, nll.view(shape), lse.view(shape)


class ChunkedHead(torch.nn.Linear):
    """A bias-free LM head whose forward, given targets, returns `chunked_lm_loss` instead of logits.

    The loss then runs through the head module's own call, so wrappers that act on module calls
    (FSDP2 gathers a sharded weight there, and reduces its gradient after) see the head used.
    Without targets it is the plain Linear: generation and exports are unchanged.
    """

    def forward(self, hidden, targets=None, valid=None, z_loss: float = 0.0, compiled: bool = False,
                token_weights=None):
        if targets is None:
            return super().forward(hidden)
        return chunked_lm_loss(hidden, self.weight, targets, valid, z_loss, compiled=compiled,
                               token_weights=token_weights)


def scored_targets(batch: dict) -> torch.Tensor:
    """[B, S-1] bool: which next-token targets count in the loss.

    Never a target across a document boundary; with a `loss_mask` (fine-tuning on part of each document,
    e.g. an S2ST target) only the tokens it marks.
    """
    doc = batch["doc_ids"]
    valid = doc[:, 1:] == doc[:, :-1]
    if "loss_mask" in batch:
        valid = valid & batch["loss_mask"][:, 1:].bool()
    return valid


def token_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position NLL, log-sum-exp, targets and the mask of scored positions ([B, S-1] each)."""
    ids, doc = batch["input_ids"], batch["doc_ids"]
    logits = model(input_ids=ids, use_cache=False, **attention_inputs(model, doc)).logits[:, :-1]
    targets = ids[:, 1:]
    lse, nll = log_sum_exp_and_nll(logits, targets)
    return nll, lse, targets, scored_targets(batch)


def chunked_head(model) -> ChunkedHead | None:
    """The model's LM head turned into a `ChunkedHead`, when its logits are a plain `hidden @ head.T` (Qwen3 and kin)
    so the loss can be chunked; None otherwise (the loss then comes from the logits).

    The head's class is changed in place (`head.__class__ = ChunkedHead`) rather than replaced by a new module:
    ChunkedHead is a `torch.nn.Linear` that adds no parameters or buffers, only a forward that also accepts
    targets, so the same Parameter objects stay in place (the optimizer, FSDP and any tied embedding keep pointing
    at them) and the state dict keeps its keys and values: checkpoints and exports are identical either way.
    Idempotent."""
    head = model.get_output_embeddings()
    plain = isinstance(head, torch.nn.Linear) and head.bias is None and hasattr(model, "model")
    if not plain or getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None):
        return None
    if not isinstance(head, ChunkedHead):
        head.__class__ = ChunkedHead
    return head


def lm_loss(model, batch: dict, z_loss: float, kind_weights: torch.Tensor | None = None,
            vocab=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training loss (mean NLL + z-loss over scored targets), per-position NLL, targets and scored mask.

    With `kind_weights` (one per `vocab.nll_groups()` group: `soda.hierarchical.loss_weights`), each target
    weighs its kind's weight: loss = sum w (nll + z lse^2) / sum w; the NLL returned is unweighted.
    Computed from the last hidden states in chunks (`chunked_lm_loss`) when the model's head allows it,
    so the full logits never exist; otherwise from the logits, as `token_nll`.
    """
    ids, doc = batch["input_ids"], batch["doc_ids"]
    targets, valid = ids[:, 1:], scored_targets(batch)
    token_weights = None if kind_weights is None else kind_weights.to(ids.device)[vocab.nll_group_of(targets)]
    head = chunked_head(model)
    if head is None:
        nll, lse, _, _ = token_nll(model, batch)
        w = valid.float() if token_weights is None else valid * token_weights
        n = w.sum().clamp(min=1e-12)
        loss = (nll * w).sum() / n
        if z_loss:
            loss = loss + z_loss * ((lse**2) * w).sum() / n
        return loss, nll, targets, valid
    hidden = model.model(input_ids=ids, use_cache=False, **attention_inputs(model, doc)).last_hidden_state
    loss, nll, _ = head(hidden[:, :-1], targets, valid, z_loss, compiled=getattr(model, "soda_compiled_loss", False),
                        token_weights=token_weights)
    return loss, nll, targets, valid
