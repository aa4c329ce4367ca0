"""SODA's optimiser: AdamW as torch's when not cautious; cautious masking as written in the paper; decay groups."""

from __future__ import annotations

import math

import pytest
import torch

from soda.optim import STATE_BYTES_PER_PARAMETER, CautiousAdamW, clip_by_global_norm, param_groups


def params_and_grads(seed: int, steps: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 2, 4)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]
    return params, grads


def run(opt_class, params, grads, **kw):
    params = [p.clone().requires_grad_() for p in params]
    opt = opt_class([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}], **kw)
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        opt.step()
    return params


def reference_cautious(params, grads, lr, betas, eps, decay):
    """The update written out one parameter at a time (Liang et al., 2024, with decoupled weight decay)."""
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, step_grads in enumerate(grads, start=1):
        for i, (p, grad) in enumerate(zip(params, step_grads)):
            p.mul_(1 - lr * decay[i])
            m[i] = betas[0] * m[i] + (1 - betas[0]) * grad
            v[i] = betas[1] * v[i] + (1 - betas[1]) * grad * grad
            update = (m[i] / (1 - betas[0] ** t)) / ((v[i] / (1 - betas[1] ** t)).sqrt() + eps)
            mask = (update * grad > 0).float()
            p.sub_(lr * update * mask / max(mask.mean().item(), 1e-3))
    return params


def test_without_cautious_masking_it_is_torch_adamw():
    params, grads = params_and_grads(0, 6)
    ours = run(CautiousAdamW, params, grads, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, cautious=False)
    torch_adamw = run(torch.optim.AdamW, params, grads, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for a, b in zip(ours, torch_adamw):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("betas,eps", [((0.98, 0.98), 1e-16), ((0.9, 0.95), 1e-8)])
def test_cautious_masking_zeroes_disagreeing_coordinates_and_rescales(betas, eps):
    params, grads = params_and_grads(1, 5)
    ours = run(CautiousAdamW, params, grads, lr=1e-2, betas=betas, eps=eps)
    want = reference_cautious(params, grads, 1e-2, betas, eps, decay=[0.1, 0.1, 0.0])
    for a, b in zip(ours, want):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ours[0], run(CautiousAdamW, params, grads, lr=1e-2, betas=betas, eps=eps,
                                           cautious=False)[0])


def test_state_survives_a_checkpoint_round_trip():
    params, grads = params_and_grads(2, 6)
    straight = run(CautiousAdamW, params, grads, lr=1e-2)
    ps = [p.clone().requires_grad_() for p in params]
    opt = CautiousAdamW([{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}], lr=1e-2)
    for k, step_grads in enumerate(grads):
        if k == 3:  # "resume": a new optimiser from the saved state
            state = opt.state_dict()
            opt = CautiousAdamW([{"params": ps[:2], "weight_decay": 0.1},
                                 {"params": ps[2:], "weight_decay": 0.0}], lr=1e-2)
            opt.load_state_dict(state)
        for p, grad in zip(ps, step_grads):
            p.grad = grad.clone()
        opt.step()
    for a, b in zip(ps, straight):
        assert torch.equal(a, b)
    assert opt.state[ps[0]]["step"].item() == 6 and math.isfinite(ps[0].sum().item())


def test_weight_decay_skips_norms_biases_and_the_input_embedding():
    from scaling.accounting import ModelShape
    from soda.model import build_model
    class Tiny:  # just what build_model reads
        bos_id, eos_id = 0, 1

    model = build_model(ModelShape(16, 1, 2, 1, 8, 32, 50), Tiny(), seed=0)
    decay, no_decay = param_groups(model, 0.033)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.033 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {
        "model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight", "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.self_attn.k_norm.weight"}
    assert "lm_head.weight" in {names[id(p)] for p in decay["params"]}


@pytest.mark.parametrize("max_norm", [None, 0.5, 1e6])
def test_clip_by_global_norm_is_torchs_clip_grad_norm(max_norm):
    params, grads = params_and_grads(3, 1)
    ours = [g.clone() for g in grads[0]]
    norm = clip_by_global_norm(ours, max_norm)
    ps = [p.clone().requires_grad_() for p in params]
    for p, g in zip(ps, grads[0]):
        p.grad = g.clone()
    want = torch.nn.utils.clip_grad_norm_(ps, max_norm if max_norm else float("inf"))
    assert norm.item() == pytest.approx(want.item(), rel=1e-6)
    for a, p in zip(ours, ps):
        torch.testing.assert_close(a, p.grad, rtol=1e-6, atol=0)
    if max_norm == 0.5:
        assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in ours])).item() == pytest.approx(0.5, rel=1e-5)
    halves = [g.clone() for g in grads[0]]  # two "shards" summed by the reduction: the norm of the whole
    assert clip_by_global_norm(halves, None, all_reduce=lambda t: t.mul_(2)).item() == pytest.approx(
        norm.item() * 2**0.5, rel=1e-6)


def test_state_bytes_per_parameter_is_what_training_holds():
    """The figure --dry-run's memory line multiplies by: a real (tiny) Qwen3 after one optimiser step holds exactly
    that many bytes per parameter in weights, gradients and optimiser state (less the per-tensor step counters)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    opt = CautiousAdamW(param_groups(model, 0.033), lr=1e-3)
    model(torch.randint(0, 300, (2, 8)), labels=torch.randint(0, 300, (2, 8))).loss.backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    held = sum(p.nbytes + p.grad.nbytes for p in model.parameters())
    held += sum(t.nbytes for state in opt.state.values() for key, t in state.items() if key != "step")
    assert held == STATE_BYTES_PER_PARAMETER * n
