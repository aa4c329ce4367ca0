"""Decoding audio for tokenizing: a file or a dataset row's bytes, cut to [start, end), mixed to mono, resampled.

A file that cannot be used (missing, corrupt, empty, non-finite, or shorter than its header declares) raises
SkipItem with the reason, so the corpus lists it as skipped instead of failing the run.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np

from tokenize_audio.errors import SkipItem, first_line
from tokenize_audio.sources import HFAudio


def load_audio(source, sample_rate: int, start: float | None = None, end: float | None = None,
               keep_truncated: bool = False) -> np.ndarray:
    """Read audio (path or HFAudio), cut [start, end) seconds, mix to mono, resample; float32.

    Raises SkipItem for missing, unreadable, empty, or non-finite audio, and for a file holding fewer
    frames than its header declares (a cut-off download or copy: its transcript covers audio that is
    not there) unless `keep_truncated`.
    """
    try:
        if isinstance(source, HFAudio):
            item = source.dataset[source.index][source.column]
            if item is None:
                raise SkipItem("no audio in this row")
            if isinstance(item, dict) and item.get("array") is not None:
                data, sr = np.asarray(item["array"], dtype=np.float32), int(item["sampling_rate"])
            else:
                raw = item.get("bytes") if isinstance(item, dict) else None
                handle = io.BytesIO(raw) if raw else item.get("path")
                if not handle:
                    raise SkipItem("no audio bytes or path in this row")
                data, sr = _read_frames(handle, None, None, keep_truncated)
        else:
            if not os.path.exists(source):
                raise SkipItem("audio file not found")
            data, sr = _read_frames(str(source), start, end, keep_truncated)
    except SkipItem:
        raise
    except Exception as err:  # soundfile/libsndfile errors on corrupt or unsupported files
        msg = first_line(err, 160) or type(err).__name__
        raise SkipItem(f"unreadable audio: {msg}") from None
    wave = data.mean(axis=1) if data.ndim == 2 else data
    if isinstance(source, HFAudio) and (start is not None or end is not None):
        wave = wave[int((start or 0) * sr): None if end is None else int(end * sr)]
    if wave.size == 0:
        raise SkipItem("zero-length audio")
    if not np.isfinite(wave).all():
        raise SkipItem("audio contains NaN or Inf samples")
    return resample(wave, sr, sample_rate)


def _read_frames(handle, start: float | None, end: float | None, keep_truncated: bool) -> tuple[np.ndarray, int]:
    """Read frames [start, end) seconds of a file or file object with soundfile; check for truncation."""
    import soundfile as sf

    info = sf.info(handle)
    sr = info.samplerate
    first = int(round((start or 0.0) * sr))
    last = int(round(end * sr)) if end is not None else -1
    if end is not None and last <= first:
        raise SkipItem(f"empty segment (start {start}, end {end})")
    declared = _declared_frames(handle, info)
    if hasattr(handle, "seek"):
        handle.seek(0)
    data, sr = sf.read(handle, start=first, stop=None if last < 0 else last, dtype="float32", always_2d=True)
    wanted = (declared if last < 0 else min(last, declared)) - first
    if len(data) < wanted and not keep_truncated:
        raise SkipItem(f"truncated audio (header says {declared / sr:.2f} s, file holds {(first + len(data)) / sr:.2f} s)")
    return data, sr


def _declared_frames(handle, info) -> int:
    """The frames a file's header promises. libsndfile reports the frames a WAV really holds (it
    shortens a data chunk that runs past the end of the file), so a WAV's data chunk is read here."""
    if info.format in ("WAV", "WAVEX"):
        if hasattr(handle, "seek"):
            handle.seek(0)
            frames = _wav_data_frames(handle)
        else:
            with open(handle, "rb") as f:
                frames = _wav_data_frames(f)
        if frames is not None:
            return max(frames, info.frames)
    return info.frames


def _wav_data_frames(f) -> int | None:
    """Frames the `data` chunk of a RIFF/WAVE header declares; None if unknown (RF64, streamed WAVs)."""
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    block_align = 0
    while True:
        chunk = f.read(8)
        if len(chunk) < 8:
            return None
        name, size = chunk[:4], int.from_bytes(chunk[4:], "little")
        if name == b"data":
            # Writers that cannot seek back (pipes) leave 0, 0xFFFFFFFF or sox's 0x7FFFF000: length unknown.
            return size // block_align if block_align and 0 < size < 0x7FFFF000 else None
        if name == b"fmt ":
            body = f.read(size + (size & 1))
            if len(body) < 14:
                return None
            block_align = int.from_bytes(body[12:14], "little")  # bytes per frame, all channels
        else:
            f.seek(size + (size & 1), 1)  # chunks are padded to an even size


def resample(wave: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target:
        return np.ascontiguousarray(wave, dtype=np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(int(sr), int(target))
    return resample_poly(wave.astype(np.float64), target // g, sr // g).astype(np.float32)
