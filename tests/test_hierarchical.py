"""The hierarchical family as a library: flat windows regrouped into steps, the backbone + depth model, its loss and
its accounting (soda.hierarchical, soda.shape.HierarchicalShape)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soda.hierarchical import (
    PAD,
    HierarchicalConfig,
    HierarchicalModel,
    count_parameters,
    flatten,
    loss_weights,
    nll_vector,
    regroup,
    regroup_batch,
    step_positions,
)
from soda.shape import (
    SIZES,
    HierarchicalShape,
    ModelShape,
    backbone_forward_flops_per_step,
    depth_forward_flops_per_frame,
    hierarchical_forward_flops_per_audio_second,
    hierarchical_forward_flops_per_step,
    hierarchical_params,
    hierarchical_training_flops_per_step,
)
from tokenize_audio.vocab import Vocabulary, byte_tokenizer

K, C = 8, 16  # Mimi's 8 codebooks, small codebooks so tiny models stay tiny


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.build(byte_tokenizer(), K, C)


def document(vocab, rng, frames: int, text: int) -> tuple[list[int], list[tuple[int, int]]]:
    """A text-first SODA document and its units: (start, length) of every text/special id (1) and frame (K)."""
    ids = [vocab.bos_id, vocab.text_start, *rng.integers(0, 256, text), vocab.text_end, vocab.audio_start]
    units = [(i, 1) for i in range(len(ids))]
    units += [(len(ids) + K * f, K) for f in range(frames)]
    ids += list(vocab.codes_to_ids(rng.integers(0, C, (K, frames))))
    units += [(len(ids), 1), (len(ids) + 1, 1)]
    return [int(i) for i in ids + [vocab.audio_end, vocab.eos_id]], units


def packed(vocab, seed: int, sizes=((5, 4), (3, 2), (4, 3))):
    """Several documents concatenated: flat ids, document ids and every unit (start, length) in the stream."""
    rng = np.random.default_rng(seed)
    ids, docs, units = [], [], []
    for d, (frames, text) in enumerate(sizes):
        one, own = document(vocab, rng, frames, text)
        units += [(len(ids) + a, n) for a, n in own]
        ids += one
        docs += [d] * len(one)
    return np.array(ids), np.array(docs), units


def tiny_config(vocab, seq_len: int = 64, **kwargs) -> HierarchicalConfig:
    return HierarchicalConfig.from_vocab(ModelShape(*SIZES["tiny"], seq_len=seq_len), vocab, **kwargs)


def tiny_model(vocab, seed: int = 0, **kwargs) -> HierarchicalModel:
    torch.manual_seed(seed)
    return HierarchicalModel(tiny_config(vocab, **kwargs)).eval()


def step_batch(vocab, ids, docs) -> dict:
    return regroup_batch({"input_ids": torch.as_tensor(ids)[None], "doc_ids": torch.as_tensor(docs)[None]}, vocab)


# --------------------------------------------------------------------------------------------
# Regrouping
# --------------------------------------------------------------------------------------------
def test_regroup_is_exact_for_every_window_cut_including_mid_frame(vocab):
    ids, docs, units = packed(vocab, 0)
    cuts = [(a, b) for a in range(40) for b in range(len(ids) - 30, len(ids) + 1)]
    mid_start = mid_end = 0
    for a, b in cuts:
        steps = regroup(ids[a:b], vocab, docs[a:b] - docs[a])
        inside = [(s, n) for s, n in units if s >= a and s + n <= b]  # units wholly in the window, in order
        assert steps.starts.tolist() == [s - a for s, _ in inside]
        for row, (s, n) in zip(steps.codes, inside):
            assert row[:n].tolist() == ids[s:s + n].tolist() and (row[n:] == PAD).all()
        assert steps.doc_ids.tolist() == [docs[s] - docs[a] for s, _ in inside]
        kept = sum(n for _, n in inside)
        assert steps.dropped == (b - a) - kept  # only partial frames are left out
        assert flatten(steps.codes).tolist() == np.concatenate([ids[s:s + n] for s, n in inside]).tolist()
        mid_start += any(s < a < s + n for s, n in units)
        mid_end += any(s < b < s + n for s, n in units)
    assert mid_start and mid_end  # the cuts did fall inside frames at both ends


def test_flatten_inverts_regroup_on_whole_frames(vocab):
    ids, docs, _ = packed(vocab, 1, sizes=((7, 5), (0, 3), (2, 0)))
    steps = regroup(ids, vocab, docs)
    assert steps.dropped == 0
    assert np.array_equal(flatten(steps.codes), ids)
    frames = (steps.codes[:, 1] != PAD).sum()
    assert frames == 9 and len(steps) == len(ids) - frames * (K - 1)
    assert np.array_equal(vocab.codebook_of(steps.codes[steps.codes[:, 1] != PAD]), np.tile(np.arange(K), (9, 1)))


def test_regroup_drops_a_broken_frame_and_never_joins_frames_across_documents(vocab):
    ids, _, _ = packed(vocab, 2, sizes=((3, 1),))
    first_frame = int(np.flatnonzero(ids == vocab.audio_start)[0]) + 1
    broken = np.delete(ids, first_frame + 3)  # frame 0 loses its codebook 3
    steps = regroup(broken, vocab)
    assert steps.dropped == K - 1 and (steps.codes[:, 1] != PAD).sum() == 2
    # half a frame ends document 0, the other half starts document 1: two partial frames, no step
    frame = ids[first_frame:first_frame + K]
    cut = np.concatenate([frame[:4], frame[4:]])
    steps = regroup(cut, vocab, np.array([0] * 4 + [1] * 4))
    assert len(steps) == 0 and steps.dropped == K


def test_regroup_batch_pads_with_steps_of_no_document(vocab):
    ids, docs, _ = packed(vocab, 3)
    a, b = regroup(ids[:60], vocab, docs[:60]), regroup(ids[5:65], vocab, docs[5:65] - docs[5])
    batch = regroup_batch({"input_ids": torch.tensor(np.stack([ids[:60], ids[5:65]])),
                           "doc_ids": torch.tensor(np.stack([docs[:60], docs[5:65] - docs[5]])),
                           "loss_mask": torch.ones(2, 60, dtype=torch.bool)}, vocab, n_steps=40)
    assert batch["codes"].shape == (2, 40, K) and batch["loss_mask"].shape == (2, 40)
    for row, steps in zip(range(2), (a, b)):
        assert batch["codes"][row, :len(steps)].tolist() == steps.codes.tolist()
        assert (batch["codes"][row, len(steps):] == PAD).all() and (batch["doc_ids"][row, len(steps):] == -1).all()
        assert not batch["loss_mask"][row, len(steps):].any()
    with pytest.raises(ValueError, match="more than 10"):
        regroup_batch({"input_ids": torch.tensor(ids[None, :60]), "doc_ids": torch.tensor(docs[None, :60])}, vocab, 10)


def test_step_positions_restart_per_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    assert step_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
def test_backbone_never_attends_across_documents(vocab):
    model = tiny_model(vocab)
    ids, docs, _ = packed(vocab, 4)
    base = step_batch(vocab, ids, docs)
    alone = [step_batch(vocab, ids[docs == d], docs[docs == d] * 0) for d in range(3)]
    with torch.no_grad():
        h = model.backbone_hidden(base["codes"], base["doc_ids"])
        for d in range(3):  # each document packed == that document alone
            own = model.backbone_hidden(alone[d]["codes"], alone[d]["doc_ids"])
            torch.testing.assert_close(h[0, base["doc_ids"][0] == d], own[0], rtol=1e-5, atol=1e-5)
        # perturb document 1 only (its text and its codes): documents 0 and 2 do not move
        other = ids.copy()
        in_1 = np.flatnonzero(docs == 1)
        audio = in_1[vocab.codebook_of(ids[in_1]) >= 0]
        other[audio] = vocab.audio_base + vocab.codebook_of(ids[audio]) * C + (ids[audio] - vocab.audio_base + 5) % C
        other[in_1[2]] = (ids[in_1[2]] + 1) % 256
        changed = step_batch(vocab, other, docs)
        h2 = model.backbone_hidden(changed["codes"], changed["doc_ids"])
    keep = base["doc_ids"][0] != 1
    assert torch.equal(h[0, keep], h2[0, keep])
    assert not torch.allclose(h[0, ~keep], h2[0, ~keep])


def test_depth_pass_sees_only_its_own_frames_earlier_codebooks(vocab):
    model = tiny_model(vocab)
    ids, docs, _ = packed(vocab, 5, sizes=((6, 2),))
    batch = step_batch(vocab, ids, docs)
    codes = batch["codes"]
    frame_steps = torch.nonzero(codes[0, :, 1] != PAD).flatten()
    s = int(frame_steps[2])  # the third frame
    with torch.no_grad():
        h = model.backbone_hidden(codes, batch["doc_ids"])
        out = model.depth_hidden(h[0, frame_steps - 1], codes[0, frame_steps])
        for k in range(K):
            changed = codes.clone()
            changed[0, s, k] = vocab.audio_id(k, (int(codes[0, s, k]) - vocab.audio_id(k, 0) + 3) % C)
            h2 = model.backbone_hidden(changed, batch["doc_ids"])
            # the backbone: steps up to s unchanged (s's state predicts the step after it), later steps changed
            assert torch.equal(h[0, :s], h2[0, :s]) and not torch.allclose(h[0, s:], h2[0, s:])
            out2 = model.depth_hidden(h2[0, frame_steps - 1], changed[0, frame_steps])
            f = 2
            # output j-1 predicts codebook j: only codebooks after k of this frame see the change
            assert torch.equal(out[f, :k], out2[f, :k]), k
            assert not torch.allclose(out[f, k:], out2[f, k:]) or k == K - 1
            assert torch.equal(out[:f], out2[:f])  # earlier frames: same backbone states, same codes
            # later frames' depth passes differ only through their backbone state, never through frame f's codes
            later = model.depth_hidden(h[0, frame_steps[f + 1:] - 1], changed[0, frame_steps[f + 1:]])
            assert torch.equal(later, out[f + 1:])


def test_loss_weights_change_the_loss_but_not_the_nll_vector(vocab):
    ids, docs, _ = packed(vocab, 6)
    batch = step_batch(vocab, ids, docs)
    results = {}
    for scheme in ("uniform", "moshi", "graded"):
        model = tiny_model(vocab, seed=1, loss_weights=scheme)
        with torch.no_grad():
            results[scheme] = model(batch)
    sums = results["uniform"][1]
    for scheme, (loss, s) in results.items():
        assert torch.equal(s, sums), scheme
        w = torch.tensor(loss_weights(scheme, K), dtype=torch.float64)
        assert float(loss) == pytest.approx(float((w * s[0]).sum() / (w * s[1]).sum()), rel=1e-5)
    losses = [float(results[s][0]) for s in results]
    assert len(set(losses)) == 3
    assert float(results["uniform"][0]) == pytest.approx(float(sums[0].sum() / sums[1].sum()), rel=1e-5)
    counts = sums[1].tolist()  # every document's first step is not scored; every frame scores K-1 acoustic codes
    assert counts[3:] == [12.0] * (K - 1) and sum(counts[:3]) == len(regroup(ids, vocab, docs)) - 3
    names = tiny_config(vocab).groups
    assert names == vocab.nll_groups()
    assert set(nll_vector(sums, names)) == set(names)


def test_chunked_loss_equals_one_chunk_in_loss_and_gradients(vocab, monkeypatch):
    from soda import hierarchical

    ids, docs, _ = packed(vocab, 10)
    batch = step_batch(vocab, ids, docs)
    runs = []
    for elements in (hierarchical.CHUNK_ELEMENTS, 3 * 278):  # one chunk; chunks of 3 rows (and of 7 frames)
        monkeypatch.setattr(hierarchical, "CHUNK_ELEMENTS", elements)
        model = tiny_model(vocab, seed=2, loss_weights="moshi").train()
        loss, sums = model(batch, z_loss=1e-3)
        loss.backward()
        runs.append((loss.detach(), sums, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, s1, g1), (l2, s2, g2) = runs
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(s1, s2)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-7, msg=name)


def test_eager_attention_gives_the_sdpa_results_on_packed_documents(vocab):
    ids, docs, _ = packed(vocab, 11)
    batch = step_batch(vocab, ids, docs)
    out = {}
    for attention in ("sdpa", "eager"):
        with torch.no_grad():
            out[attention] = tiny_model(vocab, seed=3, attention=attention)(batch)
    torch.testing.assert_close(out["sdpa"][0], out["eager"][0])
    torch.testing.assert_close(out["sdpa"][1], out["eager"][1])


def test_loss_weight_schemes():
    assert loss_weights("uniform") == [1.0] * 10
    assert loss_weights("moshi") == [100.0] * 3 + [1.0] * 7
    graded = loss_weights("graded")
    assert graded[:3] == [100.0] * 3
    assert [round(w, 1) for w in graded[3:]] == [51.8, 26.8, 13.9, 7.2, 3.7, 1.9, 1.0]
    with pytest.raises(ValueError, match="uniform, moshi, graded|choose from"):
        loss_weights("heavy")


def test_loss_mask_and_text_only_windows(vocab):
    ids, docs, _ = packed(vocab, 7, sizes=((4, 3),))
    model = tiny_model(vocab)
    mask = np.zeros(len(ids), bool)
    mask[np.flatnonzero(ids == vocab.audio_start)[0] + 1:] = True  # score only the audio and what follows
    batch = regroup_batch({"input_ids": torch.tensor(ids[None]), "doc_ids": torch.tensor(docs[None]),
                           "loss_mask": torch.tensor(mask[None])}, vocab)
    _, sums = model(batch)
    assert sums[1].tolist() == [0, 2, 4] + [4] * (K - 1)  # audio_end and EOS; 4 frames
    text = np.array([vocab.bos_id, *range(40, 60), vocab.eos_id])
    model.train()
    loss, sums = model(step_batch(vocab, text, np.zeros_like(text)))
    loss.backward()
    assert torch.isfinite(loss) and sums[1, 3:].sum() == 0
    assert model.depth_heads.grad is not None and not model.depth_heads.grad.any()  # takes part, learns nothing


def test_tiny_model_learns_a_window(vocab):
    ids, docs, _ = packed(vocab, 8)
    batch = step_batch(vocab, ids, docs)
    torch.manual_seed(0)
    model = HierarchicalModel(tiny_config(vocab, loss_weights="graded"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss, sums = model(batch, z_loss=1e-4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert loss.item() < 0.5 * first
    assert all(v < 2.5 for v in nll_vector(sums, model.config.groups).values())


def test_backbone_uses_the_flat_models_qwen3_settings(vocab):
    from soda.model import qwen3_config

    model = tiny_model(vocab)
    shape = model.config.shape.backbone
    flat = qwen3_config(shape, vocab)
    ours = model.backbone.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "rms_norm_eps", "rope_parameters", "attention_bias", "vocab_size",
                "max_position_embeddings"):
        assert getattr(ours, key) == getattr(flat, key), key


def test_config_checks(vocab):
    with pytest.raises(ValueError, match="loss weights"):
        tiny_config(vocab, loss_weights="heavy")
    two = Vocabulary.build(byte_tokenizer(), K, C, semantic_codebooks=(0, 1))
    with pytest.raises(ValueError, match="semantic codebook"):
        tiny_config(two)
    with pytest.raises(ValueError, match="ids outside"):
        regroup([vocab.size], vocab)


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, {"depth_width": 48, "depth_layers": 1, "depth_heads": 3, "depth_ffn": 40}])
def test_accounting_matches_the_built_models_parameter_count(vocab, overrides):
    model = tiny_model(vocab, **overrides)
    counted = count_parameters(model)
    assert hierarchical_params(model.config.shape) == counted["total"] == sum(p.numel() for p in model.parameters())
    assert hierarchical_params(model.config.shape, "non-embedding") == counted["non_embedding"]
    four = Vocabulary.build(byte_tokenizer(), 4, 32)
    torch.manual_seed(0)
    other = HierarchicalModel(HierarchicalConfig.from_vocab(ModelShape(96, 1, 3, 1, 32, 64), four, **overrides))
    assert hierarchical_params(other.config.shape) == sum(p.numel() for p in other.parameters())


def test_soda_hier_sizes():
    """The follow-up's SODA-Hier 1.1B: d1536/L15 backbone (~990M) + dd1152/L4 depth (~122M) with SODA's vocabulary;
    its depth module also embeds codebook 7 (never an input), 2.4M that ours does not have."""
    hier = HierarchicalShape(ModelShape.sweep(1536, seq_len=1024), depth_width=1152)
    assert hier.unified_vocab == 130_308 and hier.depth.heads == 9 and hier.depth.ffn == 4608
    assert hierarchical_params(hier) == pytest.approx(990e6 + 122e6 - 2.4e6, rel=5e-3)
    knee = HierarchicalShape(ModelShape.sweep(768, seq_len=1024))
    assert (knee.depth_width, knee.depth_layers, knee.depth.heads) == (384, 4, 3)


def test_flop_accounting_against_a_counted_forward(vocab):
    """Matmul and attention FLOPs counted by torch on a forward (eager attention) == the accounting, for a window of
    one document of frames: the backbone at every step, its head and the depth pass at every scored step. torch does
    not count the softmax (3*s*h per layer and position), so it is taken out of the accounting here."""
    from torch.utils.flop_counter import FlopCounterMode

    rng = np.random.default_rng(9)
    s = 12
    ids = vocab.codes_to_ids(rng.integers(0, C, (K, s)))
    config = tiny_config(vocab, seq_len=s, attention="eager")
    torch.manual_seed(0)
    model = HierarchicalModel(config).eval()
    batch = step_batch(vocab, ids, np.zeros(len(ids), np.int64))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(batch)
    shape = config.shape
    b, d = shape.backbone, shape.depth
    head = 2 * b.width * shape.unified_vocab
    body = backbone_forward_flops_per_step(shape) - head - b.layers * 3 * s * b.heads
    depth = depth_forward_flops_per_frame(shape) - shape.n_codebooks * d.layers * 3 * K * d.heads
    assert counter.get_total_flops() == s * body + (s - 1) * (head + depth)
    per_step = hierarchical_forward_flops_per_step(shape)
    assert per_step == backbone_forward_flops_per_step(shape) + depth_forward_flops_per_frame(shape)
    assert hierarchical_forward_flops_per_step(shape, 0.0) == backbone_forward_flops_per_step(shape)
    assert hierarchical_training_flops_per_step(shape) == 3 * per_step
    assert hierarchical_forward_flops_per_audio_second(shape) == 12.5 * per_step
