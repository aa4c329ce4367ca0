"""`soda-generate`: prompt a trained model from the command line (one request, or a JSONL file of them).

Writes OUT/ID.wav for every audio output (decoded by the model's codec), OUT/results.jsonl (one line per
request: text, wav, how it ended) and OUT/summary.json (endings, termination rate, speed). The library
behind it is `soda.generate`.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from tokenize_audio.errors import SkipItem, SodaError, cli_errors

from .generate import TASKS, Request, Settings, check_request, generate, summarize

FIELDS = {"task", "id", "text", "audio", "voice", "voice_text", "source_language", "source_text",
          "target_language", "max_seconds"}
AUDIO_FIELDS = ("audio", "voice")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soda-generate", allow_abbrev=False,
        description="Generate with a trained model: audio continuation, TTS (optionally in the voice of a "
                    "prompt), ASR, or speech-to-speech translation (SODA's prompt: source speech and text, "
                    "then the target text, then the target speech). Decoding is codebook-aware and always "
                    "stops: at <|audio_end|>/<|text_end|>, a run of silence, a length cap tied to the text "
                    "(TTS), --max-seconds or --max-text-tokens; each output reports which.",
        epilog="examples:\n"
               "  soda-generate runs/demo tts \"Hello there.\" --out gen/             # gen/tts.wav\n"
               "  soda-generate runs/demo tts \"Hello there.\" --voice me.wav --voice-text \"What I said.\"\n"
               "  soda-generate runs/demo asr speech.wav --greedy                   # prints the transcript\n"
               "  soda-generate runs/demo continue prompt.wav --max-seconds 10\n"
               "  soda-generate runs/s2st s2st source.wav --source-language fr --source-text \"Bonjour.\"\n"
               "  soda-generate runs/demo batch requests.jsonl --out gen/ --batch-size 16\n"
               "\n"
               "requests.jsonl, one JSON object a line (paths relative to the working directory or the file):\n"
               "  {\"task\": \"tts\", \"text\": \"Hi.\", \"voice\": \"v.wav\", \"voice_text\": \"...\", \"id\": \"a\"}\n"
               "  {\"task\": \"asr\", \"audio\": \"speech.wav\"}\n"
               "  {\"task\": \"continue\", \"audio\": \"prompt.wav\", \"max_seconds\": 5}\n"
               "  {\"task\": \"s2st\", \"audio\": \"src.wav\", \"source_language\": \"fr\", \"source_text\": \"...\"}\n"
               "\n"
               "ended: audio_end / text_end (the model stopped: counted as terminated), silence, "
               "text_length_cap, max_seconds, max_tokens",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="run directory, .ckpt file, Hugging Face model directory or hub id")
    p.add_argument("task", choices=[*TASKS, "batch"], help="what to generate; batch: a JSONL file of requests")
    p.add_argument("input", help="WAV (continue, asr, s2st), text (tts) or JSONL (batch)")
    p.add_argument("--out", type=Path, default=Path("generated"), help="output directory (default: generated)")
    g = p.add_argument_group("prompt")
    g.add_argument("--voice", help="tts: a WAV of the target voice ...")
    g.add_argument("--voice-text", help="... and its transcript")
    g.add_argument("--source-language", help="s2st: language code of the source speech, e.g. fr")
    g.add_argument("--source-text", help="s2st: its transcript (default: the model transcribes it first)")
    g.add_argument("--target-language", default="en", help="s2st: target language code (default en)")
    d = Settings()
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=d.temperature, help="audio tokens (0: greedy)")
    g.add_argument("--text-temperature", type=float, default=d.text_temperature, help="text tokens (default "
                                                                                     "greedy)")
    g.add_argument("--top-k", type=int, default=d.top_k, help="0: off")
    g.add_argument("--top-p", type=float, default=d.top_p, help="1: off")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--greedy", action="store_true", help="greedy for text and audio")
    g = p.add_argument_group("stopping")
    g.add_argument("--max-seconds", type=float, default=d.max_seconds, help="audio cap per output")
    g.add_argument("--max-text-tokens", type=int, default=d.max_text_tokens, help="text cap per output")
    g.add_argument("--cap-seconds-per-char", type=float, default=d.cap_seconds_per_char,
                   help="TTS/S2ST audio cap: --cap-base-seconds + this x characters of the text spoken")
    g.add_argument("--cap-base-seconds", type=float, default=d.cap_base_seconds)
    g.add_argument("--silence-seconds", type=float, default=d.silence_seconds, help="stop after this much "
                                                                                   "silence in a row; 0: off")
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="requests decoded together")
    g.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (slow; checks)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--codec", help="override the codec recorded with the model (e.g. mimi, mimi:DIR)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _file_id(value, n: int) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("._") if value is not None else ""
    return name or f"{n:05d}"


def read_requests(path: Path) -> list[dict]:
    """Parse a JSONL file of requests; every problem is reported with its line number."""
    if not path.is_file():
        raise SodaError(f"{path}: no such requests file")
    rows, seen = [], {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SodaError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise SodaError(f"{where}: expected a JSON object")
        unknown = sorted(set(row) - FIELDS)
        if unknown:
            raise SodaError(f"{where}: unknown field {', '.join(unknown)} (known: {', '.join(sorted(FIELDS))})")
        wrong = [k for k, x in row.items() if k not in ("max_seconds", "id") and not isinstance(x, (str, type(None)))]
        if wrong:
            raise SodaError(f"{where}: {', '.join(wrong)} must be a string")
        seconds = row.get("max_seconds")
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0):
            raise SodaError(f"{where}: max_seconds must be a positive number")
        if row.get("task") not in TASKS:
            raise SodaError(f"{where}: task {row.get('task')!r}; choose from {', '.join(TASKS)}")
        for key in AUDIO_FIELDS:
            if row.get(key) is not None:
                row[key] = _audio_path(str(row[key]), path.parent, where)
        row["id"] = _file_id(row.get("id"), len(rows))
        if row["id"] in seen:
            raise SodaError(f"{where}: id {row['id']!r} repeats line {seen[row['id']]}")
        seen[row["id"]] = n
        row["line"] = where
        _request(row, {k: row[k] for k in AUDIO_FIELDS if row.get(k) is not None})  # before loading the model
        rows.append(row)
    if not rows:
        raise SodaError(f"{path}: no requests in it")
    return rows


def _audio_path(value: str, base: Path, where: str) -> str:
    for candidate in (Path(value).expanduser(), base / value):
        if candidate.is_file():
            return str(candidate)
    raise SodaError(f"{where}: audio file not found: {value}")


def single_request(args) -> dict:
    row = {"task": args.task, "id": args.task, "line": f"{args.task} request", "target_language": args.target_language}
    if args.task == "tts":
        row["text"] = args.input
    else:
        row["audio"] = _audio_path(args.input, Path("."), args.task)
    if args.voice or args.voice_text:
        if args.task != "tts" or not (args.voice and args.voice_text):
            raise SodaError("--voice and --voice-text go together, with the tts task")
        row["voice"], row["voice_text"] = _audio_path(args.voice, Path("."), "--voice"), args.voice_text
    if args.task == "s2st":
        if not args.source_language:
            raise SodaError("s2st needs --source-language (e.g. fr)")
        row["source_language"], row["source_text"] = args.source_language, args.source_text
    return row


def to_request(row: dict, codec) -> Request:
    from tokenize_audio.sources import load_audio

    audio = {}
    for key in AUDIO_FIELDS:
        if row.get(key) is not None:
            try:
                audio[key] = load_audio(row[key], codec.sample_rate)
            except SkipItem as err:
                raise SodaError(f"{row['line']}: {row[key]}: {err}") from None
            if codec.whole_frames(len(audio[key])) < 1:
                raise SodaError(f"{row['line']}: {row[key]}: shorter than one codec frame")
    return _request(row, audio)


def _request(row: dict, audio: dict) -> Request:
    """The Request for a row, checked (`audio` maps audio fields to waves, or to paths for the check)."""
    request = Request(row["task"], text=row.get("text"), audio=audio.get("audio"), voice_audio=audio.get("voice"),
                      voice_text=row.get("voice_text"), source_language=row.get("source_language"),
                      source_text=row.get("source_text"), target_language=row.get("target_language") or "en",
                      max_seconds=row.get("max_seconds"), id=row["id"])
    try:
        check_request(request)
    except SodaError as err:
        raise SodaError(f"{row['line']}: {err}") from None
    return request


def write_wave(path: Path, wave: np.ndarray, sample_rate: int) -> None:
    import soundfile as sf

    from tokenize_audio.shards import atomic_write_bytes

    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1, 1), sample_rate, format="WAV", subtype="PCM_16")
    atomic_write_bytes(path, buf.getvalue())


@cli_errors("soda-generate")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.greedy:
        args.temperature = args.text_temperature = 0.0
    settings = Settings(temperature=args.temperature, text_temperature=args.text_temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, max_seconds=args.max_seconds,
                        cap_base_seconds=args.cap_base_seconds, cap_seconds_per_char=args.cap_seconds_per_char,
                        max_text_tokens=args.max_text_tokens, silence_seconds=args.silence_seconds,
                        use_cache=not args.no_cache, batch_size=args.batch_size)
    rows = read_requests(Path(args.input)) if args.task == "batch" else [single_request(args)]

    from tokenize_audio.shards import atomic_write_json, atomic_write_text

    from .inference import load_model

    loaded = load_model(args.checkpoint, device=args.device, codec=args.codec)
    codec = loaded.load_codec()
    requests = [to_request(row, codec) for row in rows]
    start = time.perf_counter()
    results = generate(loaded, requests, settings, codec, progress=args.task == "batch" and not args.quiet)
    wall = time.perf_counter() - start

    lines = []
    for row, r in zip(rows, results):
        wav = None
        if r.wave is not None:
            wav = args.out / f"{r.id}.wav"
            write_wave(wav, r.wave, codec.sample_rate)
        lines.append({"id": r.id, "task": r.task, "ended": r.ended, "terminated": r.terminated, "text": r.text,
                      **({"source_text": r.source_text} if r.source_text else {}),
                      "wav": str(wav) if wav else None, "seconds": round(r.seconds, 3),
                      "prompt_tokens": r.prompt_tokens, "generated_tokens": len(r.ids),
                      "segments_ended": r.phase_endings})
    summary = {**summarize(results), "wall_seconds": round(wall, 3),
               "audio_seconds_per_wall_second": round(sum(r.seconds for r in results) / wall, 3) if wall else None,
               "model": loaded.source, "codec": loaded.codec_label,
               "settings": {k: v for k, v in vars(settings).items() if k != "silence_codes"}}
    atomic_write_text(args.out / "results.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    atomic_write_json(args.out / "summary.json", summary)

    for x in lines if args.task != "batch" else []:
        what = f"{x['seconds']:.2f} s -> {x['wav']}" if x["wav"] else repr(x["text"])
        if x["wav"] and x["text"]:
            what = f"{x['text']!r}, {what}"
        print(f"{x['id']}: {what} (ended: {x['ended']})")
    endings = ", ".join(f"{k} {v}" for k, v in summary["ended"].items() if v)
    print(f"{len(results)} outputs, {summary['termination_rate']:.0%} stopped by the model ({endings}); "
          f"codec: {loaded.codec_label}; wrote {args.out}/results.jsonl, summary.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
