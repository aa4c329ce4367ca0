"""Listen while training: a fixed, seeded set of prompts generated at checkpoint steps (`--sample-every`).

Each round decodes, with `soda.generate`'s codebook-aware decoder (either family: `soda.generate.hierarchical`'s
for a hierarchical model, the same prompts, stops and Results), a few TTS sentences, one continuation of a
held-out utterance's first seconds and one ASR of that utterance (the first speech document of the run's
validation shards; without one those two are skipped with a logged reason). It writes

    RUN/samples/step_{step:07d}/{name}.wav     one per audio output
    RUN/samples/step_{step:07d}/samples.json   [{"name", "kind" (tts|continuation|asr), "prompt", "text",
                                                 "wav" (file name or null), "seconds", "ended"}, ...]

(the HTML report reads exactly this list) and logs the audio, its spectrogram and the texts to TensorBoard (and
W&B when on). Rank 0 only, with no collectives (other ranks go on at once); bounded by `--sample-max-seconds`
of wall-clock per round; a failure is one warning line and training goes on; the time is left out of the
throughput figures, the model goes back to train mode and every RNG training uses is restored, so the losses are
the same with and without sampling. Under FSDP the model is sharded and no sample is made (one note).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from tokenize_audio.errors import first_line

SAMPLES_DIR = "samples"
SAMPLES_FILE = "samples.json"
TTS_TEXTS = (  # fixed, short English sentences (the same every round, so rounds compare by ear)
    "The quick brown fox jumps over the lazy dog.",
    "Good morning, how are you today?",
    "She sells sea shells by the sea shore.",
)
AUDIO_SECONDS = 4.0          # cap of each generated audio output
CONTINUATION_PROMPT_SECONDS = 3.0  # the held-out utterance's first seconds given as the continuation prompt
ASR_MAX_SECONDS = 20.0       # the held-out utterance given to ASR is cut to this
ASR_MAX_TEXT_TOKENS = 128    # cap of the ASR transcript
MAX_SCAN_DOCUMENTS = 1000    # validation documents read looking for a speech document


def say(message: str) -> None:
    print(f"soda-train: samples: {message}", file=sys.stderr)


def held_out_utterance(sources, vocab) -> tuple[np.ndarray, str] | str:
    """(codes [K, F], transcript) of the first utterance of the first validation speech document (sources in
    order, shards in order, documents in order), or the reason there is none."""
    from tokenize_audio.shards import shard_documents

    seen = 0
    for source in sources:
        for shard in source.validation:
            for _, ids in shard_documents(shard, vocab_size=vocab.size):
                seen += 1
                if seen > MAX_SCAN_DOCUMENTS:
                    return f"no speech document in the first {MAX_SCAN_DOCUMENTS} validation documents"
                found = first_utterance(ids, vocab)
                if found is not None:
                    return found
    return "the run's data has no validation speech document"


def first_utterance(ids: np.ndarray, vocab) -> tuple[np.ndarray, str] | None:
    """A document's first (audio, transcript) pair: text-first documents hold T then A, audio-first A then T."""
    segments, current, kind = [], [], None
    for token in ids.tolist():
        if token in (vocab.text_start, vocab.audio_start):
            kind, current = ("text" if token == vocab.text_start else "audio"), []
        elif token in (vocab.text_end, vocab.audio_end) and kind is not None:
            segments.append((kind, current))
            kind = None
        elif kind is not None:
            current.append(token)
    for i, (kind, audio) in enumerate(segments):
        if kind != "audio" or len(audio) < vocab.n_codebooks:
            continue
        j = i - 1 if segments[0][0] == "text" else i + 1  # text-first: its transcript precedes it
        text = segments[j] if 0 <= j < len(segments) and segments[j][0] == "text" else None
        frames = len(audio) // vocab.n_codebooks * vocab.n_codebooks
        return vocab.ids_to_codes(np.asarray(audio[:frames])), vocab.decode_text(text[1]) if text else ""
    return None


def sample_prompts(utterance, frame_rate: float) -> list[tuple[str, str, str, object]]:
    """(name, kind, prompt description, Request) for one round; `utterance` is `held_out_utterance`'s answer."""
    from soda.generate.prompts import Request

    prompts = [(f"tts_{i}", "tts", text, Request("tts", text=text, max_seconds=AUDIO_SECONDS, id=f"tts_{i}"))
               for i, text in enumerate(TTS_TEXTS)]
    if not isinstance(utterance, str):
        codes, transcript = utterance
        frames = codes.shape[1]
        head = max(1, min(frames // 2 or 1, round(CONTINUATION_PROMPT_SECONDS * frame_rate)))
        prompts.append(("continuation", "continuation",
                        f"the first {head / frame_rate:.2f} s of a held-out utterance ({transcript!r})",
                        Request("continue", audio=codes[:, :head], max_seconds=AUDIO_SECONDS, id="continuation")))
        asr = codes[:, : max(1, round(ASR_MAX_SECONDS * frame_rate))]
        prompts.append(("asr", "asr", f"a held-out utterance of {asr.shape[1] / frame_rate:.2f} s; "
                                      f"reference: {transcript!r}", Request("asr", audio=asr, id="asr")))
    return prompts


def spectrogram_image(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """An RGB [H, W, 3] uint8 picture of the wave's spectrogram (matplotlib, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 2.5), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if len(wave) >= 256:
        ax.specgram(wave.astype(np.float64), NFFT=512 if len(wave) >= 512 else 256, Fs=sample_rate, noverlap=128,
                    cmap="magma")
    ax.set_xlabel("seconds")
    ax.set_ylabel("Hz")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class RNGState:
    """Save and restore every RNG training may draw from (python, numpy, torch CPU and CUDA)."""

    def __enter__(self):
        self.python, self.numpy, self.torch = random.getstate(), np.random.get_state(), torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None
        return self

    def __exit__(self, *exc):
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        return False


class Samples(L.Callback):
    """Generate the sample prompts after every `every`-th optimizer step, on rank 0 (see the module docstring)."""

    def __init__(self, out: Path, every: int, max_seconds: float, sources, codec: dict, seed: int = 0):
        self.out, self.every, self.max_seconds = Path(out), every, max_seconds
        self.sources, self.codec_info, self.seed = sources, codec, seed
        self._codec = None
        self._utterance = None
        self._done_step = None
        self._noted = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # inside an accumulation
        step = trainer.global_step
        if step == 0 or step % self.every or step == self._done_step:
            return
        self._done_step = step
        if not trainer.is_global_zero:
            return
        if type(trainer.strategy).__name__ in ("ModelParallelStrategy", "FSDPStrategy"):
            if not self._noted:
                say("skipped under FSDP (the model is sharded; generation needs the whole model)")
                self._noted = True
            return
        model = pl_module.model
        was_training = model.training
        try:
            with RNGState():
                self.sample(trainer, pl_module, step)
        except Exception as e:  # never stop training for a sample
            say(f"warning: step {step}: no samples ({first_line(e, 200, with_type=True)}); training goes on")
        finally:
            model.train(was_training)
            from soda.train.callbacks import StepMetrics

            for callback in trainer.callbacks:  # sampling time is not training throughput (as validation's)
                if isinstance(callback, StepMetrics):
                    callback._restart(trainer)

    def sample(self, trainer, pl_module, step: int) -> None:
        from soda.checkpoints import LoadedModel
        from soda.generate.cli import write_wave
        from soda.generate.decode import generate
        from soda.generate.hierarchical import decoder_for
        from soda.generate.prompts import GenerationSettings
        from tokenize_audio.codecs import load_codec
        from tokenize_audio.shards import atomic_write_bytes

        started = time.perf_counter()
        vocab, device = pl_module.vocab, pl_module.device
        if self._codec is None:
            self._codec = load_codec(self.codec_info["spec"], codebooks=vocab.n_codebooks, device=str(device))
        codec = self._codec
        if self._utterance is None:
            self._utterance = held_out_utterance(self.sources, vocab)
            if isinstance(self._utterance, str):
                say(f"no continuation or ASR prompt: {self._utterance}")
        model = pl_module.model
        model.eval()
        loaded = LoadedModel(model, vocab, self.codec_info["spec"], self.codec_info.get("label", ""),
                             f"step {step}", device)
        settings = GenerationSettings(seed=self.seed, max_seconds=AUDIO_SECONDS, max_text_tokens=ASR_MAX_TEXT_TOKENS,
                            batch_size=1)  # one at a time: the budget is checked between prompts
        folder = self.out / SAMPLES_DIR / f"step_{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        records, self._wandb_row = [], {}
        for name, kind, prompt, request in sample_prompts(self._utterance, codec.frame_rate):
            if time.perf_counter() - started > self.max_seconds:
                say(f"step {step}: --sample-max-seconds {self.max_seconds:g} spent; the other prompts are skipped")
                break
            with torch.compiler.set_stance("force_eager"), trainer.strategy.precision_plugin.forward_context():
                result = generate(loaded, [request], settings, codec, decoder=decoder_for(model))[0]
            wav = None
            if result.wave is not None and len(result.wave):
                wav = f"{name}.wav"
                write_wave(folder / wav, result.wave, codec.sample_rate)
            records.append({"name": name, "kind": kind, "prompt": prompt, "text": result.text if kind == "asr" else "",
                            "wav": wav, "seconds": round(float(result.seconds), 3), "ended": result.ended})
            self._publish(trainer, step, name, kind, prompt, result, codec.sample_rate)
        for logger in trainer.loggers:  # one W&B row per round (rows logged uncommitted one by one replace each other)
            if self._wandb_row and type(logger).__name__ == "WandbLogger":
                logger.experiment.log(self._wandb_row, commit=False)
        atomic_write_bytes(folder / SAMPLES_FILE, json.dumps(records, indent=1).encode())
        say(f"step {step}: {len(records)} in {time.perf_counter() - started:.1f} s -> {folder}")

    def _publish(self, trainer, step: int, name: str, kind: str, prompt: str, result, sample_rate: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        text = f"{kind}: {prompt}\n\n" + (f"transcript: {result.text}\n\n" if kind == "asr" else "") + \
            f"ended: {result.ended}, {result.seconds:.2f} s of audio"
        wave = result.wave if result.wave is not None and len(result.wave) else None
        image = spectrogram_image(wave, sample_rate) if wave is not None else None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                writer.add_text(f"samples/{name}", text, step)
                if wave is not None:
                    writer.add_audio(f"samples/{name}", torch.from_numpy(np.clip(wave, -1, 1)), step,
                                     sample_rate=sample_rate)
                    writer.add_image(f"samples/{name}_spectrogram", image, step, dataformats="HWC")
                writer.flush()
            elif isinstance(logger, WandbLogger):
                import wandb

                self._wandb_row[f"samples/{name}_text"] = wandb.Html(f"<pre>{text}</pre>")
                if wave is not None:
                    self._wandb_row[f"samples/{name}"] = wandb.Audio(wave, sample_rate=sample_rate, caption=text)
                    self._wandb_row[f"samples/{name}_spectrogram"] = wandb.Image(image)
