"""soda.generate.hierarchical: the hierarchical family decodes the flat decoder's plans, one backbone step per token or
frame and a KV-cached depth pass per frame, in whole frames, and always stops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from soda.generate.decode import allowed_table
from soda.generate.hierarchical import decoding_flops_per_audio_second, generate_hierarchical
from soda.generate.prompts import ENDINGS, GenerationSettings, Request, build_plan
from soda.hierarchical import HierarchicalConfig, HierarchicalModel, regroup
from soda.shape import (
    SIZES,
    HierarchicalShape,
    ModelShape,
    forward_flops_per_token,
    hierarchical_forward_flops_per_audio_second,
)
from tests.test_generate import check_ids
from tokenize_audio.errors import SodaError
from tokenize_audio.vocab import Vocabulary, byte_tokenizer

K, C = 8, 16  # Mimi's 8 codebooks, small codebooks so tiny models stay tiny


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.build(byte_tokenizer(), K, C)


def tiny_model(vocab, seed: int = 0) -> HierarchicalModel:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    return HierarchicalModel(HierarchicalConfig.from_vocab(ModelShape(*SIZES["tiny"], seq_len=64), vocab)).eval()


def mixed_requests(seed: int, n: int = 6, codebook_size: int = C) -> list[Request]:
    rng = np.random.default_rng(seed)
    codes = lambda: rng.integers(0, codebook_size, (K, int(rng.integers(1, 6))))
    make = [
        lambda: Request("tts", text="hello world"[: int(rng.integers(1, 12))]),
        lambda: Request("asr", audio=codes()),
        lambda: Request("continue", audio=codes(), max_seconds=1.0),
        lambda: Request("s2st", audio=codes(), source_language="fr", source_text="bonjour"),
        lambda: Request("tts", text="hi there", voice_audio=codes(), voice_text="a voice"),
        lambda: Request("s2st", audio=codes(), source_language="de"),
    ]
    return [make[i % len(make)]() for i in range(n)]




# --------------------------------------------------------------------------------------------
# Caches and the teacher-forced model
# --------------------------------------------------------------------------------------------
def test_kv_cached_decoding_equals_full_recompute_token_for_token(vocab):
    model = tiny_model(vocab, 3)
    requests = mixed_requests(3)
    greedy = {"temperature": 0, "max_seconds": 1.0, "max_text_tokens": 12, "batch_size": 3}
    cached = generate_hierarchical(model, vocab, requests, GenerationSettings(**greedy))
    full = generate_hierarchical(model, vocab, requests, GenerationSettings(**greedy, use_cache=False))
    alone = generate_hierarchical(model, vocab, requests, GenerationSettings(**{**greedy, "batch_size": 1}))
    assert [r.ids for r in cached] == [r.ids for r in full] == [r.ids for r in alone]
    assert [r.phase_endings for r in cached] == [r.phase_endings for r in full]
    seen = np.sum([check_ids(vocab, q.task, r.ids) for q, r in zip(requests, cached)], axis=0)
    assert seen[0] >= 20 and seen[1] >= 20, f"both phases exercised: {seen[0]} text ids, {seen[1]} frames"


@pytest.mark.parametrize("task", ["tts", "continue", "asr"])
def test_greedy_decoding_is_the_teacher_forced_models_argmax(vocab, task):
    """Prompt + output regrouped and run through the training forward (`backbone_hidden`, `depth_hidden`): at every
    generated step the constrained argmax of the unified head is the generated primary id, and the depth heads'
    argmax over each frame (seeing the step before it and its own codes only) are its codebooks 1..7."""
    model = tiny_model(vocab, 0)  # seed 0: TTS closes its audio after 9 frames, the others run to the caps
    request = mixed_requests(0)[{"tts": 0, "asr": 1, "continue": 2}[task]]
    out = generate_hierarchical(model, vocab, [request], GenerationSettings(temperature=0, max_seconds=1.0,
                                                                            max_text_tokens=12))[0]
    plan = build_plan(vocab, request, {"audio": request.audio} if request.audio is not None else {})
    prompt_steps = len(regroup(plan.prompt, vocab))
    steps = regroup(plan.prompt + out.ids, vocab)
    assert steps.dropped == 0 and len(steps) > prompt_steps + 5
    codes = torch.from_numpy(steps.codes)[None]
    with torch.no_grad():
        h = model.backbone_hidden(codes, torch.zeros(codes.shape[:2], dtype=torch.long))[0]
        table = allowed_table(vocab, model.config.shape.unified_vocab, "cpu")
        row = K if task == "asr" else 0
        logits = model.unified_head(h[prompt_steps - 1:-1]).masked_fill(~table[row], -math.inf)
        assert logits.argmax(-1).tolist() == codes[0, prompt_steps:, 0].tolist()
        is_frame = codes[0, prompt_steps:, 1] >= 0
        if task != "asr":
            frames = codes[0, prompt_steps:][is_frame]
            hd = model.depth_hidden(h[prompt_steps - 1:-1][is_frame], frames)
            best = torch.einsum("fkd,kcd->fkc", hd, model.depth_heads).argmax(-1)
            expected = frames[:, 1:] - vocab.audio_base - torch.arange(1, K) * C
            assert int(is_frame.sum()) >= 5 and torch.equal(best, expected)


def test_each_depth_pass_starts_a_fresh_cache_and_sees_at_most_one_frame(vocab):
    model = tiny_model(vocab, 1)
    seen = []

    def record(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append((cache.get_seq_length() if cache is not None else 0, kwargs["inputs_embeds"].shape[1]))

    handle = model.depth.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generate_hierarchical(model, vocab, [Request("continue", audio=np.zeros((K, 2), int), max_seconds=0.4)],
                              GenerationSettings(temperature=0))
    finally:
        handle.remove()
    frames = [i for i, (past, _) in enumerate(seen) if past == 0]
    assert len(frames) == 5 and len(seen) == 5 * (K - 1)  # 0.4 s at 12.5 frames/s; K-1 depth calls per frame
    assert all(past + new <= K for past, new in seen)
    assert [seen[i] for i in frames] == [(0, 2)] * 5  # [proj(h), emb(cb0)], nothing from another frame


# --------------------------------------------------------------------------------------------
# Whole frames, stopping
# --------------------------------------------------------------------------------------------
def test_sampled_outputs_are_whole_frames_in_codebook_order(vocab):
    settings = GenerationSettings(temperature=1.5, text_temperature=1.5, top_k=0, max_seconds=1.2, max_text_tokens=16,
                                  batch_size=6)
    frames = 0
    for seed in range(2):
        model = tiny_model(vocab, seed)
        requests = mixed_requests(seed, n=12)
        results = generate_hierarchical(model, vocab, requests, GenerationSettings(**{**vars(settings), "seed": seed}))
        for r, res in zip(requests, results):
            frames += check_ids(vocab, r.task, res.ids)[1]
            audio = [i for i in res.ids if i >= vocab.audio_base]
            assert len(audio) % K == 0
            if res.codes is not None:
                assert res.codes.shape == (K, res.codes.shape[1]) and 0 <= res.codes.min(initial=0)
                assert res.codes.max(initial=0) < C
    assert frames > 100


def test_an_untrained_model_stops_at_the_caps(vocab):
    """Caps are counted in whole frames (max seconds, the TTS text-length cap) or text ids; whichever ends an output,
    it ends at or before its cap."""
    model = tiny_model(vocab, 2)
    settings = GenerationSettings(temperature=1.0, max_seconds=0.8, max_text_tokens=7, cap_base_seconds=0.16,
                                  cap_seconds_per_char=0.08, silence_seconds=0, batch_size=4)
    one = np.ones((K, 3), int)
    requests = [Request("continue", audio=one), Request("asr", audio=one), Request("tts", text="abc"),
                Request("continue", audio=one, max_seconds=0.4)]
    caps = [("max_seconds", 10), ("max_tokens", 7), ("text_length_cap", 5), ("max_seconds", 5)]  # frames or ids
    capped = 0
    for seed in range(3):
        results = generate_hierarchical(model, vocab, requests, GenerationSettings(**{**vars(settings), "seed": seed}))
        for r, (reason, cap) in zip(results, caps):
            size = len(r.ids) if r.task == "asr" else r.codes.shape[1]
            assert r.ended in (reason, "text_end" if r.task == "asr" else "audio_end") and size <= cap, (r.ended, size)
            if r.ended == reason:
                assert size == cap
                capped += 1
    assert capped >= 6, "an untrained model mostly runs to its caps"


@pytest.mark.parametrize("after", [0, 3])
def test_a_head_rigged_to_close_the_audio_stops_at_a_frame_boundary(vocab, after):
    """The unified head is made to put <|audio_end|> first from backbone call `after + 1` on (call 0 reads the
    prompt): the output is `after` whole frames, then <|audio_end|>, and nothing more."""
    model = tiny_model(vocab, 4)
    calls = []

    def rig(module, args, output):
        calls.append(1)
        if len(calls) > after:
            output = output.clone()
            output[..., vocab.audio_end] = 1e4
        return output

    handle = model.unified_head.register_forward_hook(rig)
    try:
        out = generate_hierarchical(model, vocab, [Request("continue", audio=np.zeros((K, 2), int))],
                                    GenerationSettings(temperature=0.8, seed=after))[0]
    finally:
        handle.remove()
    assert out.ended == "audio_end" and out.phase_endings == ["audio_end"]
    assert out.ids[-1] == vocab.audio_end and len(out.ids) == after * K + 1
    assert out.codes.shape == (K, after)
    check_ids(vocab, "continue", out.ids)


def test_a_silence_run_stops_at_a_frame_boundary_and_is_cut(vocab):
    """Every code counts as silence: after round(0.24 * 12.5) = 3 frames the output stops ("silence") and those
    frames are cut from Result.codes (the ids keep them), as in the flat decoder."""
    model = tiny_model(vocab, 1)  # greedy, seed 1 runs to the caps (no <|audio_end|>)
    settings = GenerationSettings(temperature=0, silence_seconds=0.24, silence_codes=frozenset(range(C)))
    out = generate_hierarchical(model, vocab, [Request("continue", audio=np.zeros((K, 2), int))], settings)[0]
    assert out.ended == "silence" and len(out.ids) == 3 * K and out.codes.shape == (K, 0) and out.seconds == 0


# --------------------------------------------------------------------------------------------
# Every task, with a codec
# --------------------------------------------------------------------------------------------
def test_every_task_produces_a_result_with_a_codec(mimi):
    vocab = Vocabulary.build(byte_tokenizer(), K, mimi.codebook_size)
    model = tiny_model(vocab, 6)
    rng = np.random.default_rng(0)
    wave = lambda frames: (rng.standard_normal(frames * mimi.samples_per_frame) * 0.1).astype(np.float32)
    requests = [Request("tts", text="hi", id="tts"),
                Request("tts", text="hello", voice_audio=wave(3), voice_text="a voice", id="voice"),
                Request("asr", audio=wave(4), id="asr"),
                Request("continue", audio=wave(3), max_seconds=0.4, id="continue"),
                Request("s2st", audio=wave(3), source_language="fr", source_text="salut", id="s2st"),
                Request("s2st", audio=wave(2), source_language="de", id="s2st-no-source"),
                Request("instruct", audio=wave(2), text="describe", id="instruct")]
    settings = GenerationSettings(temperature=0.9, max_seconds=0.8, max_text_tokens=6, batch_size=4)
    results = generate_hierarchical(model, vocab, requests, settings, mimi)
    assert [r.id for r in results] == [r.id for r in requests]
    for q, r in zip(requests, results):
        assert r.task == q.task and r.ended in ENDINGS
        check_ids(vocab, q.task, r.ids)
        if q.task in ("tts", "continue", "s2st"):
            assert r.codes.shape[0] == K and len(r.wave) == r.codes.shape[1] * mimi.samples_per_frame
            assert r.seconds == pytest.approx(r.codes.shape[1] / mimi.frame_rate)
        else:
            assert r.codes is None and isinstance(r.text, str)
    assert len(results[5].phase_endings) == 3  # S2ST without a source text: source text, translation, speech


def test_a_vocabulary_of_another_layout_is_a_one_line_error(vocab):
    model = tiny_model(vocab)
    other = Vocabulary.build(byte_tokenizer(), K, 2 * C)
    with pytest.raises(SodaError, match="built for"):
        generate_hierarchical(model, other, [Request("tts", text="hi")])


# --------------------------------------------------------------------------------------------
# FLOPs per audio-second
# --------------------------------------------------------------------------------------------
def test_decoding_flops_per_audio_second_reuse_the_shape_accounting():
    shape = HierarchicalShape(ModelShape(*SIZES["600m"], seq_len=256))
    flops = decoding_flops_per_audio_second(shape, context_frames=256)
    assert flops["hierarchical"] == hierarchical_forward_flops_per_audio_second(shape)
    flat = ModelShape(*SIZES["600m"], vocab=shape.backbone.vocab, seq_len=256 * K)
    assert flops["flat"] == 12.5 * K * forward_flops_per_token(flat)
    # One backbone pass per frame instead of K, over a K-times shorter context: several times cheaper.
    assert flops["flat"] / flops["hierarchical"] > 4
