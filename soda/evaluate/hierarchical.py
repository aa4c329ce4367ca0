"""soda-eval on the hierarchical family (`soda.hierarchical.HierarchicalModel`): the same tasks, the same flat ids.

Likelihood. `hierarchical_log_probs` gives, like `soda.evaluate.scoring.token_log_probs`, one log-prob per scored
position of a *flat* id sequence, so every task's masks (text only, audio only, some codebooks, a continuation) apply
unchanged. A sequence is regrouped into steps (`soda.hierarchical.regroup`) and run through the backbone once; the
flat id at position t gets

    a text/special id or codebook 0    log p from the unified head at the step before its step
    codebook k >= 1 of a frame          log p from depth head k, given the backbone state before the frame and the
                                        frame's codebooks 0..k-1 (teacher-forced, as in training)

so a frame's log-likelihood is the sum over its K codebooks and a whole sequence's sum equals the model's training
NLL on it (`HierarchicalModel.forward`'s unweighted sums).

Unscored positions are NaN. The hierarchical model reads whole frames only: an audio id outside a whole frame (a
partial frame at a sequence's start or end, which `regroup` drops) has no probability under it, and neither has
anything in a sequence's first step (nothing comes before it; the flat model leaves only position 0 unscored, here
a first-step frame leaves its codebooks 1..K-1 unscored too). Tasks never count a NaN as a score: nll leaves them out
and reports `unscored_tokens`, pairs and mcq skip the item with the reason. soda-eval's own sequences (pairs, mcq)
start with BOS and hold whole frames, so they have none; nll cuts long documents at step boundaries
(`step_windows`) so that a window never splits a frame.

Generation goes through `soda.generate.hierarchical.decode_hierarchical_batch` (its `decoder_for`), so asr, tts,
s2st and mcq --mcq-mode generate decode the same plans with the same stop rules. lm-eval tasks (`soda.evaluate.lm_eval`) get
the text side as a stock causal LM, `text_causal_lm`, whose log-probs on text are `hierarchical_log_probs`'.
results.json's `model` says `family: hierarchical` (`summary`); no SODA release has this family, so no published
numbers are shown beside it.
"""

from __future__ import annotations

import numpy as np
import torch

from soda.hierarchical import PAD, HierarchicalModel, count_parameters, regroup
from tokenize_audio.encoding import length_batches

FAMILY = "hierarchical"
HEAD_CHUNK = 2048  # unified-head rows per matmul (as soda.evaluate.scoring)
UNSCORED = "audio ids outside whole frames (the hierarchical family scores whole frames only)"


def is_hierarchical(model) -> bool:
    return isinstance(model, HierarchicalModel)


def _flat_layout(steps, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each flat position's (step, slot): slot 0 is a step's first id, slot k a frame's codebook k; step -1 for an id
    `regroup` dropped."""
    step, slot = np.full(n, -1, np.int64), np.zeros(n, np.int64)
    width = (steps.codes != PAD).sum(1)
    for s, (start, w) in enumerate(zip(steps.starts, width)):
        step[start:start + w] = s
        slot[start:start + w] = np.arange(w)
    return step, slot


@torch.inference_mode()
def hierarchical_log_probs(model: HierarchicalModel, vocab, sequences: list[np.ndarray], masks: list[np.ndarray],
                           batch_tokens: int = 16384, progress: bool = False,
                           desc: str = "scoring") -> list[np.ndarray]:
    """`token_log_probs` for a HierarchicalModel: log p(ids[t] | what comes before, as the model reads it) for every
    t >= 1 with masks[i][t], per sequence, in order (float64); NaN where the model gives none (module docstring).
    Sequences are batched by flat length (`batch_tokens` padded flat tokens; a batch runs at most as many backbone
    steps) and right-padded with padding steps, which no real step attends to."""
    from tqdm import tqdm

    from soda.generate.hierarchical import check_vocabulary

    check_vocabulary(model, vocab)
    shape = model.config.shape
    k_total, size, base = shape.n_codebooks, shape.codebook_size, shape.audio_base
    device = next(model.parameters()).device
    weight = model.unified_head.weight.float()
    heads = model.depth_heads.float()
    out: list[np.ndarray | None] = [None] * len(sequences)
    batches = length_batches([len(s) for s in sequences], batch_tokens, longest_first=True)
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True, leave=False):
        rows = []
        for i in batch:
            ids = np.asarray(sequences[i], dtype=np.int64)
            steps = regroup(ids, vocab)
            step, slot = _flat_layout(steps, len(ids))
            wanted = np.asarray(masks[i], dtype=bool).copy()
            wanted[0] = False  # nothing predicts the first token
            rows.append((steps, step, slot, wanted))
        longest = max(len(r[0]) for r in rows)
        codes = torch.full((len(rows), max(longest, 1), k_total), PAD, dtype=torch.long)
        doc = torch.full((len(rows), max(longest, 1)), -1, dtype=torch.long)
        unified = torch.zeros(codes.shape[:2], dtype=torch.bool)  # steps whose first id is scored
        depth = torch.zeros(codes.shape[:2], dtype=torch.bool)  # frames with a codebook >= 1 scored
        for b, (steps, step, slot, wanted) in enumerate(rows):
            codes[b, :len(steps)] = torch.from_numpy(steps.codes)
            doc[b, :len(steps)] = 0
            hit = wanted & (step >= 1)
            unified[b, np.unique(step[hit & (slot == 0)])] = True
            depth[b, np.unique(step[hit & (slot > 0)])] = True
        codes, doc = codes.to(device), doc.to(device)
        hidden = model.backbone_hidden(codes, doc)
        prev, nxt = hidden[:, :-1], codes[:, 1:]
        # the unified head: the state at step s-1 predicts step s's first id
        u = unified[:, 1:].to(device)
        h, targets = prev[u], nxt[..., 0][u]
        u_scores = torch.cat([
            (h[j:j + HEAD_CHUNK].float() @ weight.T).log_softmax(-1).gather(-1, targets[j:j + HEAD_CHUNK, None])
            .squeeze(-1) for j in range(0, len(h), HEAD_CHUNK)
        ]) if len(h) else torch.zeros(0, device=device)
        # the depth heads: codebooks 1..K-1 of each frame, teacher-forced from the state before it
        d = depth[:, 1:].to(device)
        frames, before = nxt[d], prev[d]
        if len(frames) and k_total > 1:
            code = frames[:, 1:] - base - torch.arange(1, k_total, device=device) * size
            chunk = max(1, HEAD_CHUNK * shape.unified_vocab // ((k_total - 1) * size))
            parts = []
            for j in range(0, len(frames), chunk):
                hd = model.depth_hidden(before[j:j + chunk], frames[j:j + chunk]).float()
                logits = torch.einsum("fkd,kcd->fkc", hd, heads)
                parts.append(logits.log_softmax(-1).gather(-1, code[j:j + chunk, :, None]).squeeze(-1))
            d_scores = torch.cat(parts)
        else:
            d_scores = torch.zeros(0, max(k_total - 1, 0), device=device)
        u_scores, d_scores = u_scores.double().cpu().numpy(), d_scores.double().cpu().numpy()
        table = np.full((len(rows), codes.shape[1], k_total), np.nan)  # [row, step, slot]
        b_u, s_u = u.cpu().nonzero(as_tuple=True)  # the boolean index's order: row-major
        table[b_u.numpy(), s_u.numpy() + 1, 0] = u_scores
        b_d, s_d = d.cpu().nonzero(as_tuple=True)
        table[b_d.numpy(), s_d.numpy() + 1, 1:] = d_scores
        for b, i in enumerate(batch):
            _, step, slot, wanted = rows[b]
            t = np.flatnonzero(wanted)
            out[i] = np.where(step[t] >= 0, table[b, step[t], slot[t]], np.nan)
    return out


def text_causal_lm(model: HierarchicalModel):
    """The model's text side as a stock `transformers.Qwen3ForCausalLM`, for lm-eval's Hugging Face adapter: its
    `model` is the backbone and its `lm_head` the unified head, the same modules (shared, never copied).

    Exact on text: a text/special step `[id, PAD, ...]` embeds as the backbone's `embed_tokens[id]`, and a row of
    text steps in one document is plain causal attention at positions 0.., so `forward(ids).logits` equals
    `unified_head(backbone_hidden(steps, doc 0))` and its log-softmax is `hierarchical_log_probs`'s for text ids. The
    logits span the unified vocabulary (text, specials, codebook 0), the distribution the model itself scores text
    with; the flat family's span its whole vocabulary, so both normalise over everything their head predicts.
    Generation is transformers' own (`generate`, with its KV cache), as for the flat family."""
    from transformers import Qwen3ForCausalLM

    config = model.backbone.config
    if config.tie_word_embeddings:  # tie_weights() would replace the unified head by the input table
        raise ValueError("the backbone's config ties the word embeddings; the unified head is a table of its own")
    with torch.device("meta"):  # no weights of its own: both parts are replaced by the model's
        lm = Qwen3ForCausalLM(config)
    lm.model, lm.lm_head = model.backbone, model.unified_head
    return lm.eval()


def step_windows(ids: np.ndarray, window: int, vocab) -> list[np.ndarray]:
    """A document cut into pieces of at most `window` flat ids that never split a whole frame (each cut falls
    before a step or on an id `regroup` would drop); a frame longer than the window (window < K) is cut at the
    window all the same, its ids then unscored."""
    ids = np.asarray(ids)
    steps = regroup(ids, vocab)
    inside = np.zeros(len(ids), dtype=bool)  # ids 1..K-1 of a whole frame: no cut before them
    for start, width in zip(steps.starts, (steps.codes != PAD).sum(1)):
        inside[start + 1:start + width] = True
    cuts = np.flatnonzero(~inside)
    pieces, start = [], 0
    while start < len(ids):
        end = start + window
        if end < len(ids):
            before = cuts[(cuts > start) & (cuts <= end)]
            end = int(before[-1]) if len(before) else end
        pieces.append(ids[start:end])
        start = end
    return pieces


def summary(loaded) -> dict:
    """results.json's `model` for the hierarchical family: the backbone's and the depth decoder's shapes, parameters
    (backbone + unified head + depth decoder + acoustic heads, all counted on the module)."""
    model = loaded.model
    shape = model.config.shape
    bb, dp = shape.backbone, shape.depth
    counted = count_parameters(model)
    backbone = sum(p.numel() for p in (*model.backbone.parameters(), *model.unified_head.parameters()))
    return {"family": FAMILY, "source": loaded.source, "codec": loaded.codec_label, "vocab_size": loaded.vocab.size,
            "codebooks": loaded.vocab.n_codebooks, "parameters": counted["total"],
            "non_embedding_parameters": counted["non_embedding"],
            "backbone_parameters": backbone, "depth_parameters": counted["total"] - backbone,
            "shape": {"hidden_size": bb.width, "num_hidden_layers": bb.layers, "num_attention_heads": bb.heads,
                      "num_key_value_heads": bb.kv_heads, "head_dim": bb.head_dim, "intermediate_size": bb.ffn,
                      "unified_vocab": shape.unified_vocab, "depth_width": shape.depth_width,
                      "depth_layers": shape.depth_layers, "depth_heads": dp.heads, "depth_ffn": shape.depth_ffn},
            "soda_size": None,  # SODA released flat models only: their numbers are not this family's
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
