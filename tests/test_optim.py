"""SODA's optimiser: AdamW as torch's when not cautious; cautious masking as written in the paper; decay groups."""

from __future__ import annotations

import math

import pytest
import torch

from soda.train.optim import STATE_BYTES_PER_PARAMETER, CautiousAdamW, clip_by_global_norm, param_groups


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
    from soda.model import build_model
    from soda.shape import ModelShape
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


# --------------------------------------------------------------------------------------------
# AdamC weight decay (SODA: Levanter's adamc_weight_decay): wd_t = wd * lr_t / lr_peak
# --------------------------------------------------------------------------------------------
PEAK, WD, TOTAL = 1e-2, 0.25, 100  # a large wd so the two decay rules differ far above float noise


def one_scheduled_step(mode: str, step: int, p0: torch.Tensor, grad: torch.Tensor, cautious: bool = False):
    """A fresh optimiser whose LambdaLR (SODA's WSD over TOTAL steps) stands at `step`, then one update."""
    import warnings

    from soda.train.optim import wsd_factor

    p = p0.clone().requires_grad_()
    opt = CautiousAdamW([{"params": [p], "weight_decay": WD}], lr=PEAK, cautious=cautious, weight_decay_mode=mode)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: wsd_factor(s, TOTAL, 0.1, 0.2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping the schedule before the optimiser, on purpose
        for _ in range(step):
            sched.step()
    lr_t = opt.param_groups[0]["lr"]
    p.grad = grad.clone()
    opt.step()
    return p.detach(), lr_t


@pytest.mark.parametrize("step,factor", [(50, 1.0), (90, 0.5), (2, 0.3)])  # peak, half-way down the decay, warm-up
def test_adamc_decay_follows_the_schedule(step, factor):
    """The first update of Adam is lr_t * sign(g) (m/sqrt(v) = g/|g| after bias correction), so one step is exactly
    p * (1 - lr_t * wd_t) - lr_t * sign(g), with wd_t = wd * lr_t / lr_peak for AdamC and wd for plain AdamW."""
    g = torch.Generator().manual_seed(4)
    p0, grad = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    adamc, lr_t = one_scheduled_step("adamc", step, p0, grad)
    adamw, _ = one_scheduled_step("adamw", step, p0, grad)
    assert lr_t == pytest.approx(PEAK * factor)
    wd_t = WD * lr_t / PEAK
    torch.testing.assert_close(adamc, p0 * (1 - lr_t * wd_t) - lr_t * grad.sign(), rtol=0, atol=1e-7)
    torch.testing.assert_close(adamw, p0 * (1 - lr_t * WD) - lr_t * grad.sign(), rtol=0, atol=1e-7)
    if factor == 1.0:
        assert torch.equal(adamc, adamw)  # identical at peak LR
    else:  # AdamC shrinks by factor^2 of the peak step's decay, AdamW by factor
        shrink_c, shrink_w = (((p0 - lr_t * grad.sign()) - x).norm() / p0.norm() for x in (adamc, adamw))
        assert shrink_c.item() == pytest.approx(factor * shrink_w.item(), rel=1e-3)


def test_adamc_is_the_default_and_groups_saved_without_a_mode_keep_plain_decay():
    params, grads = params_and_grads(5, 1)
    assert CautiousAdamW([torch.zeros(1, requires_grad=True)], lr=1.0).defaults["weight_decay_mode"] == "adamc"
    p = params[0].clone().requires_grad_()
    old = CautiousAdamW([{"params": [p], "weight_decay": 0.5}], lr=1e-2, weight_decay_mode="adamw")
    state = old.state_dict()
    for group in state["param_groups"]:  # what a checkpoint written before AdamC holds
        del group["weight_decay_mode"], group["peak_lr"]
    new = CautiousAdamW([{"params": [p], "weight_decay": 0.5}], lr=1e-2)
    new.load_state_dict(state)
    new.param_groups[0]["lr"] = 5e-3
    assert CautiousAdamW.decay_factor(new.param_groups[0]) == pytest.approx(1 - 5e-3 * 0.5)
    with pytest.raises(ValueError, match="weight_decay_mode"):
        CautiousAdamW([p], lr=1e-2, weight_decay_mode="adam")


def _fsdp_adamc_worker(rank: int, world: int, port: int, results) -> None:
    """One rank of a two-process FSDP2 (fully_shard) model whose AdamC step at half LR must equal the unsharded one."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 6, bias=False), torch.nn.Linear(6, 4, bias=False))
        reference = [p.detach().clone() for p in model.parameters()]
        grads = [torch.randn_like(p, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(reference)]
        fully_shard(model)
        for p, g in zip(model.parameters(), grads):
            p.grad = torch.distributed.tensor.distribute_tensor(g, p.device_mesh, p.placements)
        opt = CautiousAdamW(model.parameters(), lr=PEAK, weight_decay=WD)
        opt.param_groups[0]["lr"] = PEAK / 2  # as the schedule sets it
        opt.step()
        full = [p.full_tensor() for p in model.parameters()]
        if rank == 0:
            ps = [p.clone().requires_grad_() for p in reference]
            plain = CautiousAdamW(ps, lr=PEAK, weight_decay=WD)
            plain.param_groups[0]["lr"] = PEAK / 2
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            plain.step()
            results.put([float((a - b.detach()).abs().max()) for a, b in zip(full, ps)])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_sharded_adamc_step_equals_the_unsharded_one():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_fsdp_adamc_worker, args=(2, port, results), nprocs=2, start_method="spawn")
    assert max(results.get()) < 1e-7
