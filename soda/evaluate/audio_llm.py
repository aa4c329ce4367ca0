"""soda-eval on the encoder-projector family (`soda.audio_llm`): the tasks asked and answered in text, mcq and asr.

The family reads a clip at 16 kHz through Whisper (cut at Whisper's 30 s window) and answers in text through its
LLM's chat template, so the native tasks that score audio tokens do not apply. Each task's entry is built by the
native task's own function (`mcq_generate.generated_entry`, `mcq.likelihood_entry`, `asr.asr_entry`), so
results.json has the same keys; its `model` names the family and its trainable and total parameters.

* mcq, generate: the instruction is `--mcq-prompt`'s (AudioMCQ's `<answer>` prompt by default), greedy, judged by
  the official scorer and the strict parser as natively; the silence control asks again with zeros as long as
  the clip.
* mcq, likelihood: each option is the response `<answer>OPTION</answer>` to AudioMCQ's instruction (the format
  `soda-finetune instruct` trains: `--mcq-format` is not consulted, a `--mcq-template` is refused). The tokens
  every option's response starts with (the `<answer>` tag) are dropped, so the per-token mean (headline) and raw
  sum compare the options' own tokens (with `</answer>` and the end of turn). Silence control as in generate.
  PMI, another item's clip, option orders and the weak/strong split are not measured for this family: their
  flags are refused.
* asr: the instruction `ASR_INSTRUCTION`, greedy, WER after SODA's normalisation.

Audio that cannot be read is skipped and counted, as natively. `--max-len` does not apply (a prompt holds at most
750 audio embeddings).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from soda.evaluate import report
from soda.evaluate.asr import Speech, asr_entry, load_speech, normalize
from soda.evaluate.mcq import likelihood_entry
from soda.evaluate.mcq_generate import PROMPTS, generated_entry
from soda.evaluate.mcq_items import Questions, read_questions
from soda.evaluate.tasks import Context, EvalSettings, available
from soda.generate.audio_llm import ASR_INSTRUCTION
from tokenize_audio.documents import mcq_instruction, mcq_response
from tokenize_audio.errors import SkipItem, SodaError

FAMILY = "encoder-projector"
TASKS = ("mcq", "asr")
HOW = {"family": FAMILY, "audio": "16 kHz through Whisper's feature extractor (cut at 30 s)"}


def check_request(names: list[str], settings: EvalSettings) -> None:
    """Refuse (one line) a task or setting this family has no meaning for, before anything is loaded."""
    other = [name for name in names if name not in TASKS]
    if other:
        raise SodaError(f"--tasks {other[0]}: an {FAMILY} model is evaluated on {' and '.join(TASKS)} only")
    defaults, model = EvalSettings(), f"an {FAMILY} model"
    refused = [
        ("--mcq-permutations", settings.mcq_permutations > 1, f"option orders are not measured for {model}"),
        ("--split-weak-strong", settings.split_weak_strong, f"the weak/strong split is not made for {model} (its "
                                                            f"silence control is in results.json)"),
        ("--mcq-template", settings.mcq_template != defaults.mcq_template,
         f"{model} is asked AudioMCQ's instruction and scored on '<answer>OPTION</answer>', not a template"),
        ("--codebooks", settings.codebooks != defaults.codebooks, f"{model} reads audio through Whisper, not a codec"),
        ("--codec", settings.codec is not None, f"{model} reads audio through Whisper, not a codec"),
    ]
    for flag, given, why in refused:
        if given:
            raise SodaError(f"{flag}: {why}")


def evaluate_encoder_projector(checkpoint: str, names: list[str], data_for: dict, settings: EvalSettings, out: Path,
                               overwrite: bool = False, compare: Path | None = None, log=None) -> dict:
    """soda-eval of an encoder-projector CHECKPOINT: the same order as natively (flags, OUT's checkpoint, every
    task's inputs, then the model), the same results.json, items/ and report."""
    import sys

    from soda.checkpoints import load_encoder_projector, model_fingerprint

    log = log or (lambda m: print(m, file=sys.stderr))
    check_request(names, settings)
    fingerprint = model_fingerprint(checkpoint)
    if not overwrite:
        report.check_checkpoint(out, fingerprint)
    ctx = Context(None, settings, out)
    inputs = {name: LOADERS[name](ctx, data_for.get(name)) for name in names}
    ctx.loaded = model = load_encoder_projector(checkpoint, settings.device)
    device = model.projector.weight.device
    log(f"soda-eval: {checkpoint} ({FAMILY}) on {device}; tasks: {', '.join(names)}")
    header = {"model": report.encoder_projector_summary(model), "checkpoint": fingerprint}
    report.claim(out, header, overwrite)
    tasks, results = available(), {}
    for name in names:
        started = time.time()
        result = RUNS[name](ctx, inputs[name])
        results[name] = report.record(out, header, name, result, settings, time.time() - started, tasks, compare,
                                      log)
    return results


# --- audio ---------------------------------------------------------------------------------------
def _waves(sources: list) -> list:
    """Each source (a path, HFAudio or (source, start, end)) at 16 kHz, or why it cannot be read (str)."""
    from soda.audio_llm import SAMPLE_RATE
    from tokenize_audio.audio import load_audio

    out = []
    for source in sources:
        path, start, end = source if isinstance(source, tuple) else (source, None, None)
        try:
            out.append(load_audio(path, SAMPLE_RATE, start, end))
        except SkipItem as err:
            out.append(str(err))
    return out


def _readable(ctx: Context, entries: list, skips, prefix: str = ""):
    """Batches of (key, item, wave) from `entries` (key, item, source, where), `generation_batch` at a time; what
    cannot be read is skipped under its `where` and counted. Waves are read a batch at a time: a benchmark's audio
    is never all in memory."""
    from tqdm import tqdm

    size = ctx.settings.generation_batch
    for first in tqdm(range(0, len(entries), size), desc="scoring", unit="batch", disable=not ctx.settings.progress,
                      leave=False, dynamic_ncols=True):
        chunk = entries[first:first + size]
        batch = []
        for (key, item, _, where), wave in zip(chunk, _waves([source for _, _, source, _ in chunk])):
            if isinstance(wave, str):
                skips.add(where, prefix + wave)
            else:
                batch.append((key, item, wave))
        if batch:
            yield batch


# --- mcq -----------------------------------------------------------------------------------------
def run_mcq(ctx: Context, data: Questions) -> dict:
    settings, model = ctx.settings, ctx.loaded
    likelihood = settings.mcq_mode != "generate"
    entries = [(n, item, item.audio, item.id) for n, item in enumerate(data.items)]
    with_audio, with_silence = {}, {}
    for batch in _readable(ctx, entries, data.skips, "audio: "):
        keys, items, waves = zip(*batch)
        silences = [np.zeros_like(w) for w in waves]
        if likelihood:
            with_audio.update(zip(keys, _option_scores(model, items, waves)))
            with_silence.update(zip(keys, _option_scores(model, items, silences)))
        else:
            asked = [{"instruction": PROMPTS[settings.mcq_prompt](it.question, it.choices)} for it in items]
            for scores, heard in ((with_audio, list(waves)), (with_silence, silences)):
                scores.update(zip(keys, model.generate(asked, settings.mcq_max_tokens, waves=heard, endings=True)))
    if not likelihood:
        return generated_entry(data, settings.mcq_prompt, with_audio, with_silence, dict(HOW),
                               settings.mcq_max_tokens)
    how = {"data": data.source, "mode": "likelihood", "format": "chat: AudioMCQ's instruction, the response "
           "'<answer>OPTION</answer>'", **HOW,
           "score": "per-token mean log-prob of each option's response after the tokens all options' responses "
                    "start with (raw sum in accuracy_raw)",
           "correct_if": "the answer's score beats every other option (ties wrong)"}
    scorer = "soda-likelihood-2 on the chat response: per-token mean (headline), raw sum; ties wrong; no PMI"
    return likelihood_entry(data, with_audio, with_silence, how, scorer)


def _option_scores(model, items, waves) -> list[tuple[list[float], list[float]]]:
    """(raw sums, per-token means) of each item's options as responses, after the tokens they all start with. One
    item's options per pass: `response_log_probs` holds logits over the whole vocabulary at every position."""
    from soda.audio_llm import Collate

    collate = Collate(model.tokenizer, model.feature_extractor, model.config)
    out = []
    for item, wave in zip(items, waves):
        instruction = mcq_instruction(item.question, item.choices)
        responses = [mcq_response(choice) for choice in item.choices]
        skip = _shared_start([collate.prompt_ids(instruction, r)[1] for r in responses])
        scores = model.response_log_probs([{"instruction": instruction, "response": r} for r in responses],
                                          waves=[wave] * len(responses))
        own = [lp[skip:] for lp in scores]
        out.append(([float(lp.sum()) for lp in own], [float(lp.mean()) for lp in own]))
    return out


def _shared_start(ids: list[list[int]]) -> int:
    """How many leading tokens every option's response has in common (each keeps at least one of its own)."""
    n = 0
    shortest = min(len(i) for i in ids)
    while n < shortest - 1 and len({i[n] for i in ids}) == 1:
        n += 1
    return n


# --- asr -----------------------------------------------------------------------------------------
def run_asr(ctx: Context, data: Speech) -> dict:
    entries = []
    for u in data.utterances:
        if normalize(u.text):
            entries.append((len(entries), u, (u.audio, u.start, u.end), u.where))
        else:
            data.skips.add(u.where, "empty reference after normalisation")
    usable, transcripts = [], []
    for batch in _readable(ctx, entries, data.skips):
        _, utterances, waves = zip(*batch)
        usable += utterances
        transcripts += ctx.loaded.generate([{"instruction": ASR_INSTRUCTION}] * len(waves),
                                           ctx.settings.max_text_tokens, waves=list(waves), endings=True)
    how = {"data": data.source, "instruction": ASR_INSTRUCTION, "decoding": "greedy",
           "max_text_tokens": ctx.settings.max_text_tokens, **HOW}
    return asr_entry(data, usable, transcripts, how)


LOADERS = {"mcq": lambda ctx, spec: read_questions(spec, ctx.settings.limit), "asr": load_speech}
RUNS = {"mcq": run_mcq, "asr": run_asr}
