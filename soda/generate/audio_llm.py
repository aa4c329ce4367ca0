"""soda-generate on the encoder-projector family (`soda.audio_llm`): text answers to instruct and asr requests.

The family reads a clip at 16 kHz through Whisper and answers in text through its LLM's chat template, greedy
(`EncoderProjectorModel.generate`). A request's instruction is its own (instruct) or `ASR_INSTRUCTION` (asr, what
soda-eval's asr task asks too). It writes no speech, so tts, continue and s2st are refused.
"""

from __future__ import annotations

from soda.generate.prompts import Result
from tokenize_audio.errors import SkipItem, SodaError

ASR_INSTRUCTION = "Transcribe the audio."
TEXT_TASKS = ("instruct", "asr")


def check_text_only(rows: list[dict], checkpoint: str) -> None:
    """Refuse (one line, naming the request) a task whose output is speech: before the model is loaded."""
    for row in rows:
        if row["task"] not in TEXT_TASKS:
            raise SodaError(f"{row['line']}: {checkpoint} is an encoder-projector model, which outputs text only "
                            f"(tasks {' and '.join(TEXT_TASKS)}, not {row['task']})")


def instruction(task: str, text: str | None = None) -> str:
    return text if task == "instruct" else ASR_INSTRUCTION


def generate_text(model, rows: list[dict], max_new_tokens: int, batch_size: int, progress: bool = False):
    """Yield (index in `rows`, Result) as each batch of `batch_size` is answered, greedy; audio that cannot be read
    is a SodaError naming its request (the requests answered before it are already yielded)."""
    from tqdm import tqdm

    from soda.audio_llm import SAMPLE_RATE
    from tokenize_audio.audio import load_audio

    for first in tqdm(range(0, len(rows), batch_size), desc="generating", unit="batch", disable=not progress,
                      leave=False, dynamic_ncols=True):
        chunk = rows[first:first + batch_size]
        waves = []
        for row in chunk:
            try:
                waves.append(load_audio(row["audio"], SAMPLE_RATE))
            except SkipItem as err:
                raise SodaError(f"{row['line']}: {row['audio']}: {err}") from None
        asked = [{"instruction": instruction(row["task"], row.get("text"))} for row in chunk]
        answers = model.generate(asked, max_new_tokens, waves=waves, endings=True)
        for k, (row, (text, ended)) in enumerate(zip(chunk, answers)):
            yield first + k, Result(row["id"], row["task"], ended, text=text)
