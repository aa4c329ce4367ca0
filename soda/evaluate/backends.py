"""Judges of generated speech, pluggable: ASR backends (TTS intelligibility) and speaker encoders (similarity).

A spec names a backend and optionally its model: `whisper`, `whisper:DIR_OR_HUB_ID`, `pocketsphinx`,
`self`; `wavlm`, `wavlm:DIR_OR_HUB_ID`, `resemblyzer`, `none`. Building one loads its model (so an
unreachable model fails before any generation); calling it takes waves and their sample rate. Add
backends by putting a factory `(model_or_None, ctx) -> callable` into `ASR` or `SPEAKER`.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenize_audio.audio import resample
from tokenize_audio.errors import SodaError, first_line

WHISPER = "openai/whisper-large-v3"  # SODA's TTS-WER model
WAVLM_SV = "microsoft/wavlm-base-plus-sv"  # a WavLM speaker-verification model that transformers loads


def _whisper(model: str | None, ctx):
    from transformers import pipeline

    name = model or WHISPER
    try:
        pipe = pipeline("automatic-speech-recognition", model=name, device=ctx.loaded.device)
    except Exception as err:
        reason = first_line(err, 160) or type(err).__name__
        raise SodaError(f"--tts-asr whisper: cannot load {name} ({reason}); without hub access download it "
                        f"elsewhere and pass --tts-asr whisper:DIR, or use --tts-asr pocketsphinx (offline, "
                        f"rough)") from None
    options = {"language": "en", "task": "transcribe"} if pipe.model.generation_config.is_multilingual else {}

    def transcribe(waves, sr):
        inputs = [{"raw": resample(w, sr, 16000), "sampling_rate": 16000} for w in waves]
        return [out["text"] for out in pipe(inputs, batch_size=8, generate_kwargs=options)]

    return transcribe


def _pocketsphinx(model: str | None, ctx):
    try:
        from pocketsphinx import Decoder
    except ImportError:
        raise SodaError("--tts-asr pocketsphinx: pip install pocketsphinx (English model included)") from None
    decoder = Decoder(samprate=16000, loglevel="FATAL", **({"hmm": model} if model else {}))

    def transcribe(waves, sr):
        texts = []
        for w in waves:
            pcm = (np.clip(resample(w, sr, 16000), -1, 1) * 32767).astype(np.int16).tobytes()
            decoder.start_utt()
            decoder.process_raw(pcm, full_utt=True)
            decoder.end_utt()
            hypothesis = decoder.hyp()
            texts.append(hypothesis.hypstr if hypothesis else "")
        return texts

    return transcribe


def _self(model: str | None, ctx):
    """The evaluated model's own ASR (round trip: can it read back what it said?)."""
    from soda.evaluate.asr import generation_settings
    from soda.generate.prompts import Request

    def transcribe(waves, sr):  # soda.generate.decode.transcribe, through the decoder of the model's family
        codec = ctx.codec
        requests = [Request("asr", audio=resample(w, sr, codec.sample_rate)) for w in waves]
        results = ctx.generate(requests, generation_settings(ctx, max_text_tokens=ctx.settings.max_text_tokens),
                               codec)
        return [r.text for r in results]

    return transcribe


def _wavlm(model: str | None, ctx):
    from transformers import AutoFeatureExtractor, WavLMForXVector

    name = model or WAVLM_SV
    try:
        extractor = AutoFeatureExtractor.from_pretrained(name)
        encoder = WavLMForXVector.from_pretrained(name).to(ctx.loaded.device).eval()
    except Exception as err:
        reason = first_line(err, 160) or type(err).__name__
        raise SodaError(f"--tts-speaker wavlm: cannot load {name} ({reason}); without hub access download it "
                        f"elsewhere and pass --tts-speaker wavlm:DIR, or use --tts-speaker none") from None
    rate = extractor.sampling_rate

    @torch.inference_mode()
    def embed(waves, sr):
        out = []
        for w in waves:  # one at a time: padding would change the pooled embedding
            inputs = extractor(resample(w, sr, rate), sampling_rate=rate, return_tensors="pt").to(ctx.loaded.device)
            out.append(torch.nn.functional.normalize(encoder(**inputs).embeddings[0].float(), dim=-1).cpu().numpy())
        return np.stack(out)

    return embed


def _resemblyzer(model: str | None, ctx):
    try:
        from resemblyzer import VoiceEncoder, preprocess_wav
    except ImportError:
        raise SodaError("--tts-speaker resemblyzer: pip install resemblyzer 'setuptools<81' (offline speaker "
                        "encoder, weights in the package)") from None
    encoder = VoiceEncoder(device=str(ctx.loaded.device), verbose=False)

    def embed(waves, sr):
        return np.stack([encoder.embed_utterance(preprocess_wav(resample(w, sr, 16000), source_sr=16000))
                         for w in waves])

    return embed


ASR = {"whisper": _whisper, "pocketsphinx": _pocketsphinx, "self": _self}
SPEAKER = {"wavlm": _wavlm, "resemblyzer": _resemblyzer, "none": lambda model, ctx: None}


def build(registry: dict, flag: str, spec: str, ctx):
    name, _, model = spec.partition(":")
    if name not in registry:
        raise SodaError(f"{flag} {spec}: choose {', '.join(registry)} (optionally NAME:MODEL)")
    return registry[name](model or None, ctx)
