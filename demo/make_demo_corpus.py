#!/usr/bin/env python3
"""Build the small bundled demo corpus for soda (``demo/corpus/``).

The corpus is meant for the demo and for tests of the tokenizer that turns
(audio, transcript) pairs into token shards.  It contains:

* ``speech/<speaker>/<recording_id>/<recording_id>-<NNNN>.flac`` -- short
  utterances (roughly 1-5 s) of synthetic English speech.  A *recording* is one
  speaker reading consecutive verses of one chapter of the King James Bible
  (5-12 utterances, in order; files sort by name in reading order).  Long
  verses are cut at a clause boundary so every utterance stays short.
* transcripts, in one of two styles per recording:

  - LibriSpeech style (about two thirds of the recordings): one
    ``<recording_id>.trans.txt`` in the recording folder, one line per
    utterance: ``<utterance_stem> <TRANSCRIPT>`` in upper case without
    punctuation (apostrophes kept), exactly like LibriSpeech;
  - same-stem ``.txt`` files (the remaining third): one ``<stem>.txt`` next
    to each ``<stem>.flac``, in normal sentence case with punctuation.

* ``text/kjv_proverbs.txt`` -- plain KJV text (Proverbs, Ecclesiastes and the
  Song of Solomon, books never used for speech) for the text-only share of
  a training mixture: one chapter per paragraph, paragraphs separated by a
  blank line, no verse numbers.

Audio is mono 16-bit FLAC at 16 kHz, except for a few recordings at 22.05 kHz
and one stereo recording (the same signal on both channels with a slight gain
difference) so that resampling and mix-down get exercised.  Leading and
trailing silence is trimmed (then a short, fixed 0.1 s pad is added back).

Speakers are synthetic: several espeak-ng English voices/variants (each with
its own pitch and speaking rate; the rate is jittered per recording within
140-190 words per minute) and the flite voices kal (its 16 kHz build
``kal16``), awb, rms and slt.  Text comes from the ``bible`` command (Debian
package ``bible-kjv``); the King James Version text is in the public domain.

Requirements: python3 with numpy and soundfile; the command line tools
``espeak-ng``, ``flite``, ``sox`` and ``bible`` (Debian packages espeak-ng,
flite, sox, bible-kjv).

Usage::

    python demo/make_demo_corpus.py [--out demo/corpus] [--seed 0] [--jobs N]

All random choices come from ``random.Random(seed)``, and the external tools
are deterministic, so the same seed (and tool versions) gives the same
corpus.  The script replaces ``<out>/speech`` and ``<out>/text/kjv_proverbs.txt``
and leaves anything else under ``<out>`` alone.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

#: Speakers: (directory name, engine, voice, base speaking rate, pitch).
#: For espeak-ng the rate is words per minute (``-s``) and pitch ``-p`` (0-99);
#: for flite the rate is turned into ``duration_stretch`` (160 wpm == 1.0).
SPEAKERS = [
    ("espeak_en_us", "espeak", "en-us", 165, 45),
    ("espeak_en_gb", "espeak", "en-gb", 155, 50),
    ("espeak_en_scotland", "espeak", "en-gb-scotland", 150, 40),
    ("espeak_en_029", "espeak", "en-029", 150, 55),
    ("espeak_en_rp", "espeak", "en-gb-x-rp", 160, 48),
    ("espeak_en_us_f3", "espeak", "en-us+f3", 170, 62),
    ("espeak_en_m3", "espeak", "en+m3", 175, 35),
    ("espeak_en_lancaster_f4", "espeak", "en-gb-x-gbclan+f4", 160, 58),
    ("flite_kal", "flite", "kal16", 160, None),
    ("flite_awb", "flite", "awb", 160, None),
    ("flite_rms", "flite", "rms", 160, None),
    ("flite_slt", "flite", "slt", 160, None),
]

#: Narrative books read aloud: (bible reference name, short id, chapters).
SPEECH_BOOKS = [
    ("Genesis", "gen", 50),
    ("Exodus", "exod", 40),
    ("Ruth", "ruth", 4),
    ("1Samuel", "1sam", 31),
    ("Esther", "esth", 10),
    ("Daniel", "dan", 12),
    ("Jonah", "jonah", 4),
    ("Matthew", "matt", 28),
    ("Mark", "mark", 16),
    ("Luke", "luke", 24),
    ("John", "john", 21),
    ("Acts", "acts", 28),
]

#: Books for the text-only file (never used for speech).
TEXT_BOOKS = [("Proverbs", 31), ("Ecclesiastes", 12), ("Song of Solomon", 8)]

NUM_RECORDINGS = 30
UTTS_PER_RECORDING = (5, 12)  # inclusive
WORDS_PER_UTTERANCE = (3, 8)  # inclusive range for the per-utterance limit
MIN_WORDS = 3
MIN_SECONDS, MAX_SECONDS = 1.0, 5.0
SPEED_RANGE = (140, 190)  # words per minute
N_22K = 4  # recordings stored at 22.05 kHz
N_STEREO = 1  # recordings stored as stereo (16 kHz)
PAD_SECONDS = 0.1
PEAK_DB_BELOW_FS = (9.0, 15.0)  # per-recording peak level, dB below full scale
SILENCE_TRIM = ["silence", "1", "0.05", "0.1%", "reverse",
                "silence", "1", "0.05", "0.1%", "reverse"]
HARD_MAX_WORDS = 10  # a clause may overrun the per-utterance limit up to this
HARD_CUT_MIN_WORDS = 6  # a cut with no clause boundary keeps at least this many
CONJUNCTIONS = {"and", "but", "for", "that", "which", "when", "because",
                "so", "then", "who", "whom", "saying", "where", "until"}
FUNCTION_WORDS = {"the", "a", "an", "his", "her", "their", "my", "thy", "thine",
                  "our", "your", "its", "of", "to", "unto", "in", "into", "on",
                  "upon", "with", "by", "from", "at", "and", "or", "that", "which",
                  "was", "were", "is", "be", "had", "have", "hath", "shall", "will",
                  "not", "all", "this", "these", "those", "no", "out", "up"}

REF_RE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


# --------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------

def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


def bible_chapter(book: str, chapter: int) -> list[str]:
    """Return the verses of one chapter (without references) via ``bible``."""
    ref = f"{book.replace(' ', '')}{chapter}:1-999"
    out = run(["bible", "-f", ref], text=True).stdout
    verses = []
    for line in out.splitlines():
        m = REF_RE.match(line.strip())
        if not m:
            continue
        if int(m.group(2)) != chapter:  # out-of-range refs are coerced
            continue
        verses.append(" ".join(m.group(4).split()))
    if not verses:
        raise RuntimeError(f"bible returned nothing for {ref!r}")
    return verses


def normalise_verse(verse: str) -> str:
    """Make a KJV verse speakable: drop brackets, de-capitalise ALL-CAPS words.

    KJV prints LORD/GOD in small capitals and the first word of some chapters
    in capitals; synthesisers would spell such words letter by letter.
    """
    verse = re.sub(r"[()\[\]]", "", verse)
    words = verse.split()
    for i, w in enumerate(words):
        letters = re.sub(r"[^A-Za-z]", "", w)
        if len(letters) >= 2 and letters.isupper():
            if letters.startswith(("LORD", "GOD", "JEHOVAH", "JAH")) or i == 0:
                words[i] = w[0] + w[1:].lower()
            else:
                words[i] = w.lower()
    return " ".join(words)


def cut_verse(verse: str, max_words: int, hard_max: int = HARD_MAX_WORDS) -> str:
    """Cut ``verse`` to a short utterance text (sentence case, punctuated).

    Preference order: the whole verse if it has at most ``max_words`` words;
    the longest prefix ending at a clause boundary (``, ; : . ? !``) within
    ``max_words``; the shortest such prefix within ``hard_max``; the same two
    for a cut just before a conjunction; finally a hard cut at ``max_words``
    (at least ``HARD_CUT_MIN_WORDS`` words) that does not end on a function
    word.
    """
    words = verse.split()
    n = len(words)
    if n <= max_words:
        k = n
    else:
        def ok(i, secondary):
            if secondary:
                return i < n and words[i].lower() in CONJUNCTIONS
            return re.search(r"[,;:.?!]$", words[i - 1]) is not None

        k = None
        for secondary in (False, True):
            short = [i for i in range(MIN_WORDS, max_words + 1) if ok(i, secondary)]
            longer = [i for i in range(max_words + 1, min(hard_max, n) + 1)
                      if ok(i, secondary)]
            if short or longer:
                k = short[-1] if short else longer[0]
                break
        if k is None:  # no boundary at all: hard cut, not too short
            k = min(max(max_words, HARD_CUT_MIN_WORDS), n)
            while k > MIN_WORDS and words[k - 1].lower() in FUNCTION_WORDS:
                k -= 1
    text = " ".join(words[:k])
    text = re.sub(r"[,;:]+$", "", text)
    if not re.search(r"[.?!]$", text):
        text += "."
    return text[0].upper() + text[1:]


def librispeech_text(text: str) -> str:
    """LibriSpeech-style transcript: upper case, no punctuation but apostrophes."""
    text = re.sub(r"[^A-Za-z' ]+", " ", text.replace("-", " ")).upper()
    return " ".join(text.split())


def write_text_file(path: Path) -> int:
    """Write the text-only file: one chapter per paragraph, no verse numbers."""
    paragraphs = []
    for book, n_chapters in TEXT_BOOKS:
        for ch in range(1, n_chapters + 1):
            paragraphs.append(" ".join(bible_chapter(book, ch)))
    data = "\n\n".join(paragraphs) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data, encoding="utf-8")
    return len(data.encode("utf-8"))


# --------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------

@dataclass
class Utterance:
    stem: str
    verse: str  # normalised full verse
    max_words: int
    text: str = ""  # sentence-case text actually spoken
    audio: np.ndarray | None = None


@dataclass
class Recording:
    rec_id: str
    speaker: tuple
    book: str
    chapter: int
    first_verse: int
    speed: int
    sample_rate: int
    stereo: bool
    style: str  # "librispeech" or "txt"
    gain_db: float
    utts: list[Utterance] = field(default_factory=list)


def synthesize(text: str, rec: Recording, tmpdir: str, tag: str) -> np.ndarray:
    """Synthesize ``text`` with the recording's voice; trim, resample, normalise.

    Returns int16 samples (mono) at ``rec.sample_rate``.
    """
    _, engine, voice, _, pitch = rec.speaker
    raw = os.path.join(tmpdir, f"{tag}.raw.wav")
    out = os.path.join(tmpdir, f"{tag}.wav")
    if engine == "espeak":
        run(["espeak-ng", "-v", voice, "-s", str(rec.speed), "-p", str(pitch),
             "-w", raw, text])
    else:
        stretch = 160.0 / rec.speed
        run(["flite", "-voice", voice, "--setf", f"duration_stretch={stretch:.3f}",
             "-t", text, "-o", raw])
    # -R: repeatable, -D: no dither (keeps digital silence, deterministic).
    run(["sox", "-R", "-D", raw, "-b", "16", "-c", "1", out, *SILENCE_TRIM,
         "rate", "-v", str(rec.sample_rate), "norm", f"{rec.gain_db:.1f}",
         "pad", str(PAD_SECONDS), str(PAD_SECONDS)])
    audio, sr = sf.read(out, dtype="int16")
    assert sr == rec.sample_rate and audio.ndim == 1, (sr, audio.shape)
    return audio


def render_utterance(rec: Recording, utt: Utterance, tmpdir: str) -> None:
    """Synthesize one utterance, shortening the text until it is <= 5 s
    (at most 8 attempts); pad to 1 s if shorter than that."""
    max_words, hard_max = utt.max_words, HARD_MAX_WORDS
    for _attempt in range(8):
        text = cut_verse(utt.verse, max_words, hard_max)
        audio = synthesize(text, rec, tmpdir, utt.stem)
        dur = len(audio) / rec.sample_rate
        n_words = len(text.split())
        if dur <= MAX_SECONDS or n_words <= MIN_WORDS:
            break
        hard_max = n_words - 1
        max_words = max(MIN_WORDS, min(max_words, n_words) - 2)
    if dur < MIN_SECONDS:  # very short verse: pad symmetrically to 1 s
        missing = int(np.ceil(MIN_SECONDS * rec.sample_rate)) - len(audio)
        audio = np.pad(audio, (missing // 2, missing - missing // 2))
    utt.text, utt.audio = text, audio


# --------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------

def plan(rng: random.Random) -> list[Recording]:
    n = NUM_RECORDINGS
    # Every speaker gets at least two recordings; the rest are random.
    spk_idx = [i for i in range(len(SPEAKERS)) for _ in range(2)]
    spk_idx += [rng.randrange(len(SPEAKERS)) for _ in range(n - len(spk_idx))]
    rng.shuffle(spk_idx)
    # Distinct (book, chapter) passages, drawn in a seeded random order.
    all_chapters = [(b, sid, c) for b, sid, nc in SPEECH_BOOKS
                    for c in range(1, nc + 1)]
    rng.shuffle(all_chapters)
    chapter_iter = iter(all_chapters)
    styles = ["txt"] * (n // 3) + ["librispeech"] * (n - n // 3)
    rng.shuffle(styles)
    special = rng.sample(range(n), N_22K + N_STEREO)
    recs = []
    for i in range(n):
        speaker = SPEAKERS[spk_idx[i]]
        n_utts = rng.randint(*UTTS_PER_RECORDING)
        while True:  # next unused chapter that is long enough
            book, book_id, chapter = next(chapter_iter)
            verses = [normalise_verse(v) for v in bible_chapter(book, chapter)]
            if len(verses) >= n_utts:
                break
        first = rng.randrange(len(verses) - n_utts + 1)
        speed = min(max(speaker[3] + rng.randint(-10, 10), SPEED_RANGE[0]),
                    SPEED_RANGE[1])
        rec_id = f"{speaker[0]}-{book_id}{chapter:02d}v{first + 1:02d}"
        rec = Recording(
            rec_id=rec_id, speaker=speaker, book=book, chapter=chapter,
            first_verse=first + 1, speed=speed,
            sample_rate=22050 if i in special[:N_22K] else 16000,
            stereo=i in special[N_22K:], style=styles[i],
            gain_db=-round(rng.uniform(*PEAK_DB_BELOW_FS), 1))
        for j in range(n_utts):
            rec.utts.append(Utterance(
                stem=f"{rec_id}-{j:04d}", verse=verses[first + j],
                max_words=rng.randint(*WORDS_PER_UTTERANCE)))
        recs.append(rec)
    return recs


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

def write_recording(rec: Recording, speech_dir: Path) -> None:
    folder = speech_dir / rec.speaker[0] / rec.rec_id
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for utt in rec.utts:
        audio = utt.audio
        if rec.stereo:  # same signal, right channel ~1.5 dB quieter
            right = np.round(audio.astype(np.float32) * 0.85).astype(np.int16)
            audio = np.stack([audio, right], axis=1)
        sf.write(folder / f"{utt.stem}.flac", audio, rec.sample_rate,
                 format="FLAC", subtype="PCM_16",
                 compression_level=1.0)
        if rec.style == "librispeech":
            lines.append(f"{utt.stem} {librispeech_text(utt.text)}\n")
        else:
            (folder / f"{utt.stem}.txt").write_text(utt.text + "\n",
                                                    encoding="utf-8")
    if lines:
        (folder / f"{rec.rec_id}.trans.txt").write_text("".join(lines),
                                                        encoding="utf-8")


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo/corpus", type=Path,
                    help="output directory (default: demo/corpus)")
    ap.add_argument("--seed", default=0, type=int, help="random seed (default: 0)")
    ap.add_argument("--jobs", default=max(2, os.cpu_count() or 1), type=int,
                    help="parallel synthesis jobs (default: CPU count)")
    args = ap.parse_args(argv)

    for tool in ("espeak-ng", "flite", "sox", "bible"):
        if shutil.which(tool) is None:
            sys.exit(f"error: required tool {tool!r} not found on PATH")

    rng = random.Random(args.seed)
    recs = plan(rng)

    speech_dir = args.out / "speech"
    text_path = args.out / "text" / "kjv_proverbs.txt"
    if speech_dir.exists():
        shutil.rmtree(speech_dir)
    text_bytes = write_text_file(text_path)

    jobs = [(rec, utt) for rec in recs for utt in rec.utts]
    with tempfile.TemporaryDirectory(prefix="soda_demo_") as tmpdir:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda ru: render_utterance(ru[0], ru[1], tmpdir), jobs))
    for rec in recs:
        write_recording(rec, speech_dir)

    # ---- summary ----------------------------------------------------------
    durs = np.array([len(u.audio) / r.sample_rate for r, u in jobs])
    n_spk = len({r.speaker[0] for r in recs})
    print(f"wrote {args.out}/")
    print(f"  utterances : {len(jobs)}")
    print(f"  recordings : {len(recs)} "
          f"({sum(r.style == 'librispeech' for r in recs)} LibriSpeech .trans.txt, "
          f"{sum(r.style == 'txt' for r in recs)} same-stem .txt; "
          f"{sum(r.sample_rate == 22050 for r in recs)} at 22.05 kHz, "
          f"{sum(r.stereo for r in recs)} stereo)")
    print(f"  speakers   : {n_spk}")
    print(f"  seconds    : {durs.sum():.1f} total "
          f"(min {durs.min():.2f}, mean {durs.mean():.2f}, max {durs.max():.2f})")
    print(f"  text       : {text_path} ({text_bytes / 1024:.1f} KiB)")
    print(f"  size       : {dir_size(args.out) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
