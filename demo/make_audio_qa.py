#!/usr/bin/env python3
"""A tiny synthetic audio question-answering set, for instruction tuning and MCQ scoring offline.

Four kinds of item, each a short clip (16 kHz WAV) with a question about it:

* beeps (audio-required): "How many beeps are in the clip?" -- one to four tone bursts;
* pitch (audio-required): "Is the second tone higher or lower than the first?";
* digits (audio-required): "Which digit is spoken?" -- an espeak-ng voice says a digit;
* text (text-answerable): a question answered by its own words ("Which of these is a colour?"),
  asked over an unrelated clip. Without audio these are still answerable; the rest are not, which is
  what AudioMCQ's weak/strong split (`soda-eval --tasks mcq --split-weak-strong`) should find.

Output in OUT:

* `audio/*.wav` -- each clip is used by several items (an MCQ and a free-form instruction), so the
  total hours of the items exceed the unique hours, as in real instruction sets;
* `train.json`, `test.json` -- MMAU-shaped lists of {id, audio, question, choices, answer (text), task, kind};
* `instruct.jsonl` -- free-form items {id, audio, instruction, response, task} on the training clips
  ("Count the beeps." -> "three").

Needs espeak-ng for the digits (or `--no-speech`). The same settings give the same files.

    python demo/make_audio_qa.py --out runs/audio-qa --items 40
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SR = 16000
NUMBERS = ["one", "two", "three", "four"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VOICES = [("en-us+m3", 170, 40), ("en-us+f2", 160, 60), ("en+m7", 180, 30)]
TEXT_QUESTIONS = [  # (question, choices, answer): answerable from the words alone
    ("Which of these is a colour?", ["red", "dog", "table", "seven"], "red"),
    ("Which of these is an animal?", ["chair", "horse", "green", "river"], "horse"),
    ("What is the opposite of up?", ["left", "down", "near", "fast"], "down"),
    ("Which of these is a fruit?", ["apple", "stone", "cloud", "shoe"], "apple"),
    ("Which word means the same as big?", ["tiny", "large", "quiet", "thin"], "large"),
    ("Which of these can fly?", ["bird", "fish", "rock", "cup"], "bird"),
    ("Which day comes after Monday?", ["Sunday", "Tuesday", "Friday", "Saturday"], "Tuesday"),
    ("What do you call frozen water?", ["steam", "ice", "sand", "milk"], "ice"),
]
FREE_FORM = {"beeps": "Count the beeps.", "pitch": "Say whether the second tone is higher or lower.",
             "digits": "Say the spoken digit."}


def tone(freq: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    ramp = np.minimum(1, np.minimum(t, t[::-1]) / 0.01)  # no clicks
    return (0.4 * np.sin(2 * np.pi * freq * t) * ramp).astype(np.float32)


def beeps_clip(n: int, freq: float, rng) -> np.ndarray:
    gap = lambda: np.zeros(int(rng.uniform(0.08, 0.14) * SR), np.float32)  # noqa: E731
    parts = [gap()] + [p for _ in range(n) for p in (tone(freq, rng.uniform(0.1, 0.14)), gap())]
    return _pad(np.concatenate(parts), 1.3)


def pitch_clip(higher: bool, rng) -> np.ndarray:
    low = rng.uniform(250, 400)
    high = low * rng.uniform(2.0, 3.0)
    first, second = (low, high) if higher else (high, low)
    silence = np.zeros(int(0.1 * SR), np.float32)
    return _pad(np.concatenate([silence, tone(first, 0.3), silence, tone(second, 0.3)]), 1.0)


def _pad(wave: np.ndarray, seconds: float) -> np.ndarray:
    n = int(seconds * SR)
    return np.pad(wave, (0, max(0, n - len(wave))))[:n]


def spoken_digit(word: str, voice: tuple, tmp: Path) -> np.ndarray:
    from tokenize_audio.audio import load_audio

    name, speed, pitch = voice
    path = tmp / f"{word}-{name.replace('+', '_')}-{speed}-{pitch}.wav"
    subprocess.run(["espeak-ng", "-v", name, "-s", str(speed), "-p", str(pitch), "-w", str(path), word],
                   check=True, capture_output=True)
    return _pad(load_audio(str(path), SR), 1.0)


def make_set(out: Path, items: int = 40, test_items: int = 16, seed: int = 0, speech: bool = True) -> Path:
    """Write the set into `out` (`items` training and `test_items` test clips per kind); returns `out`."""
    import soundfile as sf

    if speech and shutil.which("espeak-ng") is None:
        raise SystemExit("make_audio_qa: espeak-ng is not installed (Debian package espeak-ng); or --no-speech")
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    kinds = ["beeps", "pitch", "text"] + (["digits"] if speech else [])
    splits = {"train": [], "test": []}
    free, spoken = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for split, count in (("train", items), ("test", test_items)):
            for kind in kinds:
                for i in range(count):
                    clip_id = f"{split}-{kind}-{i:03d}"
                    if kind == "beeps":
                        n = int(rng.integers(1, 5))
                        wave = beeps_clip(n, rng.choice([500.0, 700.0, 900.0]), rng)
                        question, choices, answer = "How many beeps are in the clip?", NUMBERS, NUMBERS[n - 1]
                    elif kind == "pitch":
                        higher = bool(rng.integers(2))
                        wave = pitch_clip(higher, rng)
                        question = "Is the second tone higher or lower than the first?"
                        choices, answer = ["higher", "lower"], "higher" if higher else "lower"
                    elif kind == "digits":  # espeak-ng is deterministic: each clip a voice, rate and pitch of its
                        while True:          # own, or a test clip could be a training clip (contamination)
                            name, speed, pitch = VOICES[int(rng.integers(len(VOICES)))]
                            word = DIGITS[int(rng.integers(10))]
                            said = (word, name, speed + int(rng.integers(-20, 21)), pitch + int(rng.integers(-15, 16)))
                            if said not in spoken:
                                break
                        spoken.add(said)
                        wave = spoken_digit(word, said[1:], Path(tmp))
                        others = [d for d in DIGITS if d != word]
                        choices = sorted([word, *rng.choice(others, 3, replace=False)], key=DIGITS.index)
                        question, answer = "Which digit is spoken?", word
                    else:
                        question, choices, answer = TEXT_QUESTIONS[(i + (split == "test")) % len(TEXT_QUESTIONS)]
                        wave = beeps_clip(int(rng.integers(1, 5)), 600.0, rng)
                    path = f"audio/{clip_id}.wav"
                    sf.write(str(out / path), wave, SR, subtype="PCM_16")
                    splits[split].append({"id": clip_id, "audio": path, "question": question,
                                          "choices": list(choices), "answer": answer, "task": kind,
                                          "kind": "text-answerable" if kind == "text" else "audio-required"})
                    if split == "train" and kind in FREE_FORM:
                        free.append({"id": f"{clip_id}-free", "audio": path, "instruction": FREE_FORM[kind],
                                     "response": answer, "task": kind})
    for split, rows in splits.items():
        (out / f"{split}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "instruct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in free))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for audio/, train.json, test.json, "
                                                           "instruct.jsonl")
    p.add_argument("--items", type=int, default=40, help="training clips per kind (default 40)")
    p.add_argument("--test-items", type=int, default=16, help="test clips per kind (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-speech", action="store_true", help="no spoken digits (no espeak-ng needed)")
    args = p.parse_args(argv)
    out = make_set(args.out, args.items, args.test_items, args.seed, not args.no_speech)
    print(f"wrote {out}/train.json, test.json, instruct.jsonl and audio/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
