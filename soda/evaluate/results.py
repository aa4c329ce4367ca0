"""The results soda-eval shows: OUT/results.json (`read_results`), and SODA's released base models, recognised by
shape, with their published results to compare a checkpoint of the same size with. Both the Markdown table
(`report`) and the page (`html_report`) read them; `report` also writes the page, so they live below both."""

from __future__ import annotations

import json
from pathlib import Path

from tokenize_audio.errors import SodaError

RESULTS = "results.json"

# SODA's released base models, identified by shape (width, layers, FFN), and their published results
# (the SODA-LongRun table of the authors' experiment log; accuracies in %, WER in %, SIM a cosine).
SODA_SHAPES = {(512, 15, 1792): "135M", (1024, 28, 3072): "600M", (2048, 28, 6144): "1.7B",
               (2560, 36, 9728): "4B"}
SODA_PUBLISHED = {
    "135M": {"sblimp": 50.1, "swuggy": 56.3, "salmon": 70.0, "tblimp": 67.4, "twuggy": 70.7, "asr": 28.1,
             "tts_wer": 11.2, "tts_sim": 0.500},
    "600M": {"sblimp": 51.2, "swuggy": 58.9, "salmon": 70.1, "tblimp": 70.7, "twuggy": 73.1, "asr": 10.2,
             "tts_wer": 7.6, "tts_sim": 0.555},
    "1.7B": {"sblimp": 51.4, "swuggy": 60.6, "salmon": 70.6, "tblimp": 70.3, "twuggy": 74.7, "asr": 7.0,
             "tts_wer": 6.9, "tts_sim": 0.560},
    "4B": {"sblimp": 52.4, "swuggy": 61.8, "salmon": 70.4, "tblimp": 71.3, "twuggy": 74.8, "asr": 5.0,
           "tts_wer": 6.1, "tts_sim": 0.560, "hellaswag": 52.6},
}


def soda_size(model) -> str | None:
    c = model.config
    return SODA_SHAPES.get((getattr(c, "hidden_size", None), getattr(c, "num_hidden_layers", None),
                            getattr(c, "intermediate_size", None)))


def read_results(out: Path) -> dict | None:
    """OUT/results.json as written, or None when there is none."""
    path = Path(out) / RESULTS
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SodaError(f"{path}: unreadable ({err}); use another --out, or --overwrite to replace it") from None
