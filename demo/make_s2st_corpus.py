#!/usr/bin/env python3
"""A tiny synthetic speech-to-speech translation set (French -> English) in CVSS-T's shape.

Every speaker says each French sentence and its English translation in the *same* espeak-ng voice
variant (CVSS-T's targets keep the source speaker's voice); the few fixed sentences make the
mapping learnable by a tiny model in seconds, which the fine-tuning tests rely on. Output:
`OUT/manifest.tsv` (header: id, source_audio, source_text, source_language, target_text,
target_audio; paths relative to it), `OUT/fr/*.wav`, `OUT/en/*.wav`. Needs `espeak-ng`; the same
settings give the same files.

    python demo/make_s2st_corpus.py --out runs/s2st-demo-data
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from pathlib import Path

SENTENCES = [  # (French, English)
    ("Bonjour.", "Hello."),
    ("Merci beaucoup.", "Thank you very much."),
    ("Il fait beau.", "The weather is nice."),
    ("Où est la gare ?", "Where is the station?"),
]
SPEAKERS = [("m3", 230, 40), ("f2", 250, 60), ("m7", 220, 30)]  # espeak-ng variant, words/minute, pitch


def speak(text: str, voice: str, variant: str, speed: int, pitch: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-v", f"{voice}+{variant}", "-s", str(speed), "-p", str(pitch), "-w", str(path),
                    text], check=True, capture_output=True)


def make_corpus(out: Path, sentences=SENTENCES, speakers=SPEAKERS) -> Path:
    """Write the set into `out`; returns the manifest path."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("make_s2st_corpus: espeak-ng is not installed (Debian package espeak-ng)")
    out = Path(out)
    rows = []
    for variant, speed, pitch in speakers:
        for i, (french, english) in enumerate(sentences):
            name = f"{variant}_{i:02d}"
            speak(french, "fr", variant, speed, pitch, out / "fr" / f"{name}.wav")
            speak(english, "en-us", variant, speed, pitch, out / "en" / f"{name}.wav")
            rows.append([name, f"fr/{name}.wav", french, "fr", english, f"en/{name}.wav"])
    manifest = out / "manifest.tsv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "source_audio", "source_text", "source_language", "target_text", "target_audio"])
        writer.writerows(rows)
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    print(make_corpus(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
