"""Batched codec encoding, the one loop behind soda-tokenize, S2ST preparation and soda-eval's audio tasks.

Waves are cut to whole codec frames before encoding, so batching them (right-padding to the longest) cannot change
a causal codec's codes; sorting by length keeps the padding small.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from tokenize_audio.audio import load_audio
from tokenize_audio.codecs import Codec
from tokenize_audio.errors import SkipItem

AUDIO_BLOCK = 256  # clips read and encoded at a time by `audio_codes`


def default_batch_seconds(codec: Codec) -> float:
    """Padded audio seconds per encoder batch unless --batch-seconds: large batches measured slower on CPU."""
    return 120.0 if codec.device.type == "cuda" else 5.0


def length_batches(lengths: list[int], budget: int, longest_first: bool = False) -> list[list[int]]:
    """Indices in batches of similar length, each of at most `budget` padded items (a longer item gets a batch of
    its own). Shortest first for tokenizing; longest first for evaluation, whose scores and codes must stay as
    they were (batch membership can move a codec's rounding near-ties)."""
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i] if longest_first else lengths[i]):
        if batch and max(lengths[batch[0]], lengths[i]) * (len(batch) + 1) > budget:
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches


def encode_waves(codec: Codec, waves: list[np.ndarray], batch_seconds: float,
                 done: Callable[[list[int]], None] | None = None, longest_first: bool = False) -> list[np.ndarray]:
    """Codes [K, F] per whole-frame wave, in order, from batches of at most `batch_seconds` padded audio;
    `done(indices)` after each batch (progress)."""
    out: list = [None] * len(waves)
    budget = max(1, int(batch_seconds * codec.sample_rate))
    for batch in length_batches([len(w) for w in waves], budget, longest_first):
        for i, codes in zip(batch, codec.encode_batch([waves[i] for i in batch])):
            out[i] = codes
        if done is not None:
            done(batch)
    return out


def codec_wave(codec: Codec, source, start: float | None = None, end: float | None = None) -> np.ndarray:
    """Audio (a path, HFAudio or wave) at the codec's rate, cut to whole frames; SkipItem if unusable."""
    if isinstance(source, np.ndarray):
        wave = source.astype(np.float32)
    else:
        wave = load_audio(source, codec.sample_rate, start, end)
    frames = codec.whole_frames(len(wave))
    if frames < 1:
        raise SkipItem(f"shorter than one codec frame ({len(wave)} samples)")
    return wave[: frames * codec.samples_per_frame]


def audio_codes(codec: Codec, sources: list, batch_seconds: float, desc: str = "encoding audio",
                progress: bool = True) -> list:
    """Codes for each source (a path, HFAudio, wave, or (source, start, end)), or why it is unusable (str).

    Audio is read and encoded a block at a time: only the codes stay in memory. Longest first, as evaluation and
    S2ST preparation always batched (their codes stay bit-identical).
    """
    from tqdm import tqdm

    out: list = []
    with tqdm(total=len(sources), desc=desc, unit="clip", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for first in range(0, len(sources), AUDIO_BLOCK):
            waves, slots = [], []
            for source in sources[first:first + AUDIO_BLOCK]:
                try:
                    waves.append(codec_wave(codec, *source) if isinstance(source, tuple) else codec_wave(codec, source))
                    slots.append(len(waves) - 1)
                except SkipItem as err:
                    slots.append(str(err))
            codes = encode_waves(codec, waves, batch_seconds, longest_first=True)
            out += [slot if isinstance(slot, str) else codes[slot] for slot in slots]
            bar.update(len(slots))
    return out
