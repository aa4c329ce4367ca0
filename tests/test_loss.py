"""The chunked LM-head loss is the full-logits loss: values, per-token NLL and every gradient."""

from __future__ import annotations

import pytest
import torch

from soda.train.loss import chunked_lm_loss


def reference(hidden, weight, targets, valid, z_loss):
    logits = (hidden @ weight.T).float()
    lse = torch.logsumexp(logits, -1)
    nll = lse - logits.gather(-1, targets[..., None]).squeeze(-1)
    n = valid.sum().clamp(min=1)
    return (nll * valid).sum() / n + z_loss * (lse.square() * valid).sum() / n, nll, lse


def inputs(seed=0, b=3, s=37, d=16, v=101):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, d, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (b, s), generator=g)
    valid = torch.rand(b, s, generator=g) > 0.3
    return hidden, weight, targets, valid


@pytest.mark.parametrize("chunk", [1, 7, 37, 1000])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_loss_and_gradients_equal_the_full_logits_path(chunk, z_loss):
    hidden, weight, targets, valid = inputs()
    loss, nll, lse = chunked_lm_loss(hidden, weight, targets, valid, z_loss, chunk=chunk)
    (2.5 * loss).backward()  # a non-unit upstream gradient must scale the precomputed ones
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref_loss, ref_nll, ref_lse = reference(hidden, weight, targets, valid, z_loss)
    (2.5 * ref_loss).backward()
    # float64 inputs: the head runs in float64, the softmax in float32 (as in training), hence 1e-6
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    torch.testing.assert_close(nll, ref_nll.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1], weight.grad, rtol=1e-5, atol=1e-7)
    assert not nll.requires_grad and not lse.requires_grad


def test_no_gradient_pass_and_no_scored_token():
    hidden, weight, targets, valid = inputs(seed=1)
    with torch.no_grad():
        loss, nll, _ = chunked_lm_loss(hidden, weight, targets, valid, 1e-4, chunk=5)
        ref_loss, ref_nll, _ = reference(hidden, weight, targets, valid, 1e-4)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6) and not loss.requires_grad
    torch.testing.assert_close(nll, ref_nll.float())
    loss, _, _ = chunked_lm_loss(hidden, weight, targets, torch.zeros_like(valid), 1e-4, chunk=5)
    loss.backward()
    assert loss.item() == 0 and hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_bf16_autocast_matches_autocast_logits_path():
    """Under bf16 autocast the head runs in bf16 like autocast's own linear; gradients land in the fp32 weights."""
    hidden, weight, targets, valid = (t.float().detach() if t.is_floating_point() else t for t in inputs(seed=2))
    hidden.requires_grad_(), weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, nll, _ = chunked_lm_loss(hidden, weight, targets, valid, 1e-4, chunk=16)
    loss.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(hidden, weight)
    lse = torch.logsumexp(logits.float(), -1)
    ref_nll = lse - logits.float().gather(-1, targets[..., None]).squeeze(-1)
    n = valid.sum()
    ((ref_nll * valid).sum() / n + 1e-4 * (lse.square() * valid).sum() / n).backward()
    assert weight.grad.dtype == got[1].dtype == torch.float32
    torch.testing.assert_close(nll, ref_nll, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[0], hidden.grad, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(got[1], weight.grad, rtol=2e-2, atol=2e-4)


def test_training_loss_on_a_qwen3_with_packed_documents_equals_the_logits_path(train_tokens):
    from soda.model import build_model
    from soda.shape import ModelShape
    from soda.train.loss import chunked_head, lm_loss, token_nll
    from tokenize_audio.vocab import Vocabulary

    vocab = Vocabulary.load(train_tokens)
    model = build_model(ModelShape(32, 2, 4, 2, 8, 64, vocab.size), vocab, seed=0).double()
    assert chunked_head(model) is model.lm_head
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, vocab.size, (2, 24), generator=g),
             "doc_ids": torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 9 + [2] * 10])}
    loss, nll, _, valid = lm_loss(model, batch, 1e-4)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref_nll, lse, _, _ = token_nll(model, batch)
    n = valid.sum()
    ((ref_nll * valid).sum() / n + 1e-4 * (lse.square() * valid).sum() / n).backward()
    assert loss.item() == pytest.approx(((ref_nll * valid).sum() / n + 1e-4 * (lse.square() * valid).sum() / n).item(),
                                        rel=1e-6)
    torch.testing.assert_close(nll, ref_nll.detach(), rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_chunk_arithmetic_matches_eager():
    """`--compile` runs the chunk arithmetic through torch.compile (fused kernels); results must not change."""
    hidden, weight, targets, valid = (t.float().detach() if t.is_floating_point() else t for t in inputs(seed=3))
    results = []
    for compiled in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, nll, _ = chunked_lm_loss(h, w, targets, valid, 1e-2, chunk=50, compiled=compiled)
        loss.backward()
        results.append((loss.item(), nll, h.grad, w.grad))
    (loss, nll, gh, gw), (c_loss, c_nll, c_gh, c_gw) = results
    assert c_loss == pytest.approx(loss, rel=1e-6)
    for a, b in ((c_nll, nll), (c_gh, gh), (c_gw, gw)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_recomputes_layers_with_the_same_gradients(train_tokens, monkeypatch):
    from transformers.models.qwen3 import modeling_qwen3

    from soda.train.config import TrainConfig
    from soda.train.loss import lm_loss
    from soda.train.run import model_for_run
    from tokenize_audio.vocab import Vocabulary

    calls = []
    mlp_forward = modeling_qwen3.Qwen3MLP.forward
    monkeypatch.setattr(modeling_qwen3.Qwen3MLP, "forward", lambda self, x: calls.append(1) or mlp_forward(self, x))
    vocab = Vocabulary.load(train_tokens)
    batch = {"input_ids": torch.randint(0, vocab.size, (2, 32), generator=torch.Generator().manual_seed(0)),
             "doc_ids": torch.tensor([[0] * 12 + [1] * 20, [0] * 32])}
    runs = []
    for checkpointing in (False, True):
        model, _ = model_for_run(TrainConfig(size="tiny", activation_checkpointing=checkpointing), vocab)
        layers = len(model.model.layers)
        calls.clear()
        loss = lm_loss(model, batch, 1e-4)[0]
        loss.backward()
        runs.append((len(calls), loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (plain_calls, plain_loss, plain_grads), (ckpt_calls, ckpt_loss, ckpt_grads) = runs
    assert (plain_calls, ckpt_calls) == (layers, 2 * layers)  # each layer again in the backward pass
    assert ckpt_loss == plain_loss
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)
