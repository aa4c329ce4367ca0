"""Generation for the hierarchical family (`soda.hierarchical.HierarchicalModel`): the flat decoder's prompts, phases,
stop rules and Results, with one backbone step per text/special token or audio frame and a depth pass per frame.

    from soda.generate.hierarchical import generate_hierarchical
    results = generate_hierarchical(model, vocab, requests, GenerationSettings(temperature=0.8), codec)

What is shared with `soda.generate.decode` (so both families are prompted, stopped and reported alike): the plan of
each request (`prompts.build_plan`: prompt ids and text/audio phases), the per-request state machine (`SequenceState`:
forced ids, <|text_end|> / <|audio_end|>, max seconds, the TTS/S2ST text-length cap, the silence stop, max text
tokens), the allowed-id table, the sampler (temperature / top-k / top-p, greedy at 0) and `Result` building.

What differs is the loop. The prompt's flat ids are regrouped into steps (`soda.hierarchical.regroup`; a prompt
holds whole frames only) and run through the backbone once, with a KV cache. Then, per backbone step and per row:

    forced id (a phase's prefix or closing)   -> fed as a text/special step
    text phase    the unified head samples a text id or <|text_end|>
    audio phase   the unified head samples a codebook-0 id or <|audio_end|> (the frame-level stop); for a code,
                  the depth decoder runs over [proj(h), emb(cb0), ..., emb(cb6)] with a KV cache of its own
                  (fresh per frame: a frame's depth pass sees the backbone state and its own codes only),
                  sampling cb1..cb7 one at a time from the K-1 acoustic heads

and the step (the id, or the whole frame: the sum of its K embeddings) is the backbone's next input. The output
ids are the flat decoder's layout (a frame is its K ids in codebook order), so audio always comes in whole frames
and every output stops (the caps are counted in frames). Requests are decoded `settings.batch_size` at a time
(left-padded steps, finished rows leave the batch; the depth pass runs for the rows writing a frame this step).
`use_cache=False` recomputes the backbone over every step and the depth decoder over the frame so far each time:
the check that the caches change nothing.

This module does not load checkpoints: the caller passes the model and its vocabulary (`soda-generate` takes them from
`soda.checkpoints.load_model(..., hierarchical=True)`: an export, a run directory or a `.ckpt`).
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import torch

from soda.checkpoints import LoadedModel
from soda.generate.decode import SequenceState, allowed_table, generate, generate_iter, sample_ids, sample_next
from soda.generate.prompts import GenerationSettings, Plan, Request, Result
from soda.hierarchical import PAD, HierarchicalModel, regroup
from soda.shape import HierarchicalShape, forward_flops_per_token, hierarchical_forward_flops_per_audio_second
from tokenize_audio.errors import SodaError


def _cache_kwargs(stack, cache) -> dict:
    """transformers renamed `past_key_values` to `cache` during 5.x (as soda.generate.decode)."""
    name = "cache" if "cache" in inspect.signature(stack.forward).parameters else "past_key_values"
    return {name: cache}


def _new_cache(stack, use_cache: bool):
    if not use_cache:
        return None
    from transformers import DynamicCache

    return DynamicCache(config=stack.config)


def check_vocabulary(model: HierarchicalModel, vocab) -> None:
    """SodaError unless `vocab` is the vocabulary `model` was built on (same audio layout and text size)."""
    shape = model.config.shape
    mine = (shape.n_codebooks, shape.codebook_size, shape.audio_base, model.config.text_size)
    theirs = (vocab.n_codebooks, vocab.codebook_size, vocab.audio_base, vocab.text_size)
    if mine != theirs:
        raise SodaError(f"the hierarchical model was built for (codebooks, codebook size, audio base, text size) "
                        f"{mine}, the vocabulary has {theirs}")


def depth_frames(model: HierarchicalModel, hidden: torch.Tensor, cb0: torch.Tensor, settings: GenerationSettings,
                 gen: torch.Generator, use_cache: bool = True) -> torch.Tensor:
    """Complete frames from their codebook-0 ids: [F, d] backbone states (the step before each frame) and [F] cb0
    flat ids -> [F, K] flat ids. The depth decoder reads [proj(h), emb(cb0), ..., emb(cb_{K-2})] (the positions of
    `HierarchicalModel.depth_hidden`), its output at position k samples codebook k through head k-1; each call is a
    batch of independent frames with a fresh cache."""
    shape = model.config.shape
    k_total, size, base = shape.n_codebooks, shape.codebook_size, shape.audio_base
    n = len(cb0)
    temperature = torch.full((n,), settings.temperature, device=hidden.device)
    ids = [cb0]
    x = torch.cat([model.depth_in(hidden)[:, None], model.depth.embed_tokens(cb0 - base)[:, None]], dim=1)
    cache = _new_cache(model.depth, use_cache)
    inputs, positions = x, torch.arange(2, device=hidden.device)
    for k in range(1, k_total):
        out = model.depth(inputs_embeds=inputs, position_ids=positions.expand(n, -1), use_cache=use_cache,
                          **_cache_kwargs(model.depth, cache)).last_hidden_state[:, -1]
        code = sample_ids((out @ model.depth_heads[k - 1].T).float(), temperature, settings.top_k, settings.top_p, gen)
        ids.append(base + k * size + code)
        if k + 1 == k_total:
            break
        step = model.depth.embed_tokens(ids[-1] - base)[:, None]
        x = torch.cat([x, step], dim=1)
        if use_cache:
            inputs, positions = step, torch.tensor([k + 1], device=hidden.device)
        else:
            inputs, positions = x, torch.arange(k + 2, device=hidden.device)
    return torch.stack(ids, dim=1)


@torch.inference_mode()
def decode_hierarchical_batch(model: HierarchicalModel, vocab, plans: list[Plan], settings: GenerationSettings,
                              frame_rate: float, silence: frozenset | None, gen: torch.Generator) -> list[SequenceState]:
    """`soda.generate.decode.decode_batch` for a HierarchicalModel: the same plans in, the same `SequenceState`s out
    (their ids in the flat layout), one backbone step per token or frame (module docstring)."""
    check_vocabulary(model, vocab)
    device = next(model.parameters()).device
    k_total = vocab.n_codebooks
    seqs = [SequenceState(p, vocab, settings, frame_rate, silence) for p in plans]
    prompts = []
    for p in plans:
        steps = regroup(p.prompt, vocab)
        if steps.dropped:
            raise SodaError(f"a prompt holds {steps.dropped} audio ids outside whole frames")
        prompts.append(torch.from_numpy(steps.codes))
    longest = max(len(c) for c in prompts)
    codes = torch.full((len(plans), longest, k_total), PAD, dtype=torch.long, device=device)
    mask = torch.zeros(len(plans), longest, dtype=torch.long, device=device)
    for i, c in enumerate(prompts):  # left-padded: every row's next step is at the end
        codes[i, longest - len(c):] = c.to(device)
        mask[i, longest - len(c):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    table = allowed_table(vocab, model.config.shape.unified_vocab, device)  # rows 0 (cb0 + <|audio_end|>), K (text)
    cache = _new_cache(model.backbone, settings.use_cache)
    live = list(range(len(seqs)))  # batch row -> sequence
    inputs, input_pos = codes, positions
    while True:
        hidden = model.backbone(inputs_embeds=model.embed_steps(inputs), attention_mask=mask, position_ids=input_pos,
                                use_cache=settings.use_cache,
                                **_cache_kwargs(model.backbone, cache)).last_hidden_state[:, -1]
        logits = model.unified_head(hidden).float()
        chosen = sample_next(logits, table, seqs, live, settings, gen)
        picked = chosen.tolist()
        writes_frame = [b for b, i in enumerate(live) if not seqs[i].forced and seqs[i].mode == "audio"
                        and picked[b] != vocab.audio_end]
        frames = {}
        if writes_frame:
            index = torch.tensor(writes_frame, device=device)
            done = depth_frames(model, hidden[index], chosen[index], settings, gen, settings.use_cache).tolist()
            frames = dict(zip(writes_frame, done))
        step = torch.full((len(live), k_total), PAD, dtype=torch.long)
        for b, i in enumerate(live):
            s = seqs[i]
            if s.forced:
                token = s.forced.popleft()
                s.push(token, True)
                step[b, 0] = token
            elif b in frames:
                for token in frames[b]:
                    s.push(token, False)
                step[b] = torch.tensor(frames[b])
            else:
                s.push(picked[b], False)
                step[b, 0] = picked[b]
        keep = [b for b, i in enumerate(live) if not seqs[i].done]
        if not keep:
            break
        if len(keep) < len(live):  # drop finished rows from every tensor (and the cache)
            index = torch.tensor(keep, dtype=torch.long, device=device)
            if cache is not None:
                cache.batch_select_indices(index)
            codes, mask, positions = codes[index], mask[index], positions[index]
            step, live = step[keep], [live[b] for b in keep]
        step = step.to(device)[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
        if cache is not None:
            inputs, input_pos = step, positions[:, -1:]
        else:
            codes = torch.cat([codes, step], 1)
            inputs, input_pos = codes, positions
    return seqs


# --------------------------------------------------------------------------------------------
# The API (mirrors soda.generate.decode.generate / generate_iter)
# --------------------------------------------------------------------------------------------
def decoder_for(model):
    """The batch decoder of `model`'s family, for `soda.generate.decode.generate(..., decoder=)`: this module's
    `decode_hierarchical_batch` for a HierarchicalModel, None (the flat `decode_batch`) for any other model."""
    return decode_hierarchical_batch if isinstance(model, HierarchicalModel) else None


def _loaded(model: HierarchicalModel, vocab) -> LoadedModel:
    check_vocabulary(model, vocab)
    return LoadedModel(model, vocab, None, "none", "hierarchical model", next(model.parameters()).device)


def generate_hierarchical(model: HierarchicalModel, vocab, requests: list[Request],
                          settings: GenerationSettings | None = None, codec=None,
                          progress: bool = False) -> list[Result]:
    """`soda.generate.decode.generate` for a HierarchicalModel (in eval mode) and the `Vocabulary` it was built on:
    any mix of tasks, results in input order, the same prompts, stop rules, Results and one-line errors."""
    return generate(_loaded(model, vocab), requests, settings, codec, progress, decoder=decode_hierarchical_batch)


def generate_hierarchical_iter(model: HierarchicalModel, vocab, requests: list[Request],
                               settings: GenerationSettings | None = None, codec=None, progress: bool = False):
    """`soda.generate.decode.generate_iter` for a HierarchicalModel: (index in `requests`, Result) per request as
    each batch finishes (what `soda-generate`'s batch mode writes out one by one)."""
    yield from generate_iter(_loaded(model, vocab), requests, settings, codec, progress,
                             decoder=decode_hierarchical_batch)


# --------------------------------------------------------------------------------------------
# FLOPs to decode a second of audio, the two families at one backbone size
# --------------------------------------------------------------------------------------------
def decoding_flops_per_audio_second(shape: HierarchicalShape, context_frames: float,
                                    frame_rate: float = 12.5) -> dict[str, float]:
    """Forward FLOPs to generate one second of audio with KV caches, {"flat": ..., "hierarchical": ...}, at the
    backbone `shape.backbone` (layers, widths; its vocab is the flat vocabulary) and `context_frames` frames
    attended on average (prompt + half the output; the attention term of `soda.shape.forward_flops_per_token`
    at that context):

        flat          frame_rate * K tokens, each one pass of the flat model (LM head over the flat vocabulary)
                      attending context_frames * K tokens
        hierarchical  frame_rate backbone steps (unified head) attending context_frames steps, plus one depth pass
                      per frame (`soda.shape.hierarchical_forward_flops_per_audio_second`; the depth attention is
                      charged at its full K positions, an upper bound)"""
    k = shape.n_codebooks
    flat = forward_flops_per_token(replace(shape.backbone, seq_len=max(1, round(context_frames * k))))
    steps = replace(shape, backbone=replace(shape.backbone, seq_len=max(1, round(context_frames))))
    return {"flat": frame_rate * k * flat,
            "hierarchical": hierarchical_forward_flops_per_audio_second(steps, frame_rate)}
