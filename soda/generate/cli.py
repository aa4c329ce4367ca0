"""`soda-generate`: prompt a trained model from the command line (one request, or a JSONL file of them).

Writes OUT/ID.wav for every audio output (decoded by the model's codec), OUT/results.jsonl (one line per
request: text, wav, how it ended) and OUT/summary.json (endings, termination rate, speed). The library
behind it is `soda.generate` (`soda.generate.hierarchical` for a hierarchical model: every task alike).

Outputs survive a kill: each request's wav is written (atomically) and then its results.jsonl line (flushed)
as soon as its batch finishes, and only one batch of generated audio is held in memory. OUT/run.json records
the checkpoint and settings; a re-run into the same OUT with the same ones skips the requests already done
(same id, same request, wav present) and generates the rest; with other ones it is refused unless --overwrite.
At the end results.jsonl is rewritten in request order and summary.json covers every request.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from soda.checkpoints import encoder_projector_source, is_hierarchical, model_fingerprint
from soda.generate.decode import generate_iter
from soda.generate.prompts import TASKS, GenerationSettings, Request, Result, check_request, summarize
from tokenize_audio.errors import SkipItem, SodaError, cli_errors

FIELDS = {"task", "id", "text", "audio", "voice", "voice_text", "source_language", "source_text",
          "target_language", "max_seconds"}
AUDIO_FIELDS = ("audio", "voice")
RUN, RESULTS, SUMMARY = "run.json", "results.jsonl", "summary.json"
RUN_ONLY = ("batch_size", "use_cache")  # settings that change how fast, not what is generated: may differ on resume


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
               "  soda-generate runs/qa instruct clip.wav --instruction \"How many beeps are there?\"\n"
               "  soda-generate runs/s2st s2st source.wav --source-language fr --source-text \"Bonjour.\"\n"
               "  soda-generate runs/demo batch requests.jsonl --out gen/ --batch-size 16\n"
               "\n"
               "requests.jsonl, one JSON object a line (paths relative to the working directory or the file):\n"
               "  {\"task\": \"tts\", \"text\": \"Hi.\", \"voice\": \"v.wav\", \"voice_text\": \"...\", \"id\": \"a\"}\n"
               "  {\"task\": \"asr\", \"audio\": \"speech.wav\"}\n"
               "  {\"task\": \"continue\", \"audio\": \"prompt.wav\", \"max_seconds\": 5}\n"
               "  {\"task\": \"s2st\", \"audio\": \"src.wav\", \"source_language\": \"fr\", \"source_text\": \"...\"}\n"
               "  {\"task\": \"instruct\", \"audio\": \"clip.wav\", \"text\": \"What is the speaker's mood?\"}\n"
               "\n"
               "ended: audio_end / text_end (the model stopped: counted as terminated), silence, "
               "text_length_cap, max_seconds, max_tokens",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="run directory, .ckpt file, Hugging Face model directory or hub id")
    p.add_argument("task", choices=[*TASKS, "batch"], help="what to generate; batch: a JSONL file of requests")
    p.add_argument("input", help="WAV (continue, asr, s2st, instruct), text (tts) or JSONL (batch)")
    p.add_argument("--out", type=Path, default=Path("generated"),
                   help="output directory (default: generated); each output is written as it finishes, and a "
                        "re-run into it with the same checkpoint and settings generates only what is missing")
    g = p.add_argument_group("prompt")
    g.add_argument("--voice", help="tts: a WAV of the target voice ...")
    g.add_argument("--voice-text", help="... and its transcript")
    g.add_argument("--source-language", help="s2st: language code of the source speech, e.g. fr")
    g.add_argument("--source-text", help="s2st: its transcript (default: the model transcribes it first)")
    g.add_argument("--target-language", default="en", help="s2st: target language code (default en)")
    g.add_argument("--instruction", help="instruct: what to do with the audio (the model answers in text; "
                                         "the format soda-finetune instruct trains)")
    d = GenerationSettings()
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
    g.add_argument("--overwrite", action="store_true",
                   help="replace the outputs already in --out; without it a re-run with the same checkpoint and "
                        "settings skips the requests already done, and one with others is refused")
    return p


def _file_id(value, n: int) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("._") if value is not None else ""
    return name or f"{n:05d}"


def read_requests(path: Path) -> list[dict]:
    """Parse a JSONL file of requests; every problem is reported with its line number."""
    if not path.is_file():
        raise SodaError(f"{path}: no such requests file")
    rows, seen = [], {}
    for n, line in enumerate(path.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
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
    if (args.task == "instruct") != bool(args.instruction):
        raise SodaError("--instruction goes with the instruct task, which needs it")
    if args.task == "instruct":
        row["text"] = args.instruction
    if args.task == "s2st":
        if not args.source_language:
            raise SodaError("s2st needs --source-language (e.g. fr)")
        row["source_language"], row["source_text"] = args.source_language, args.source_text
    return row


def to_request(row: dict, codec) -> Request:
    """The row's Request, its audio read and encoded to codes (a request holds codes, not its wave)."""
    from tokenize_audio.audio import load_audio

    audio = {}
    for key in AUDIO_FIELDS:
        if row.get(key) is not None:
            try:
                wave = load_audio(row[key], codec.sample_rate)
            except SkipItem as err:
                raise SodaError(f"{row['line']}: {row[key]}: {err}") from None
            if codec.whole_frames(len(wave)) < 1:
                raise SodaError(f"{row['line']}: {row[key]}: shorter than one codec frame")
            audio[key] = codec.encode(wave)
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


# --------------------------------------------------------------------------------------------
# OUT: written as requests finish, resumed by a re-run
# --------------------------------------------------------------------------------------------
def request_digest(row: dict) -> str:
    """What a request asks for: its fields, and the size and modification time of its audio files."""
    audio = {k: [os.stat(row[k]).st_size, os.stat(row[k]).st_mtime_ns] for k in AUDIO_FIELDS if row.get(k)}
    fields = {k: v for k, v in row.items() if k != "line"}
    return hashlib.sha256(json.dumps([fields, audio], sort_keys=True).encode()).hexdigest()[:16]


def read_lines(out: Path) -> list[dict]:
    """OUT/results.jsonl's complete lines (a run killed while appending may leave half a line: it is dropped)."""
    try:
        text = (out / RESULTS).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "id" in row:
            lines.append(row)
    return lines


def _difference(old: dict, new: dict) -> str | None:
    """How the run recorded in OUT/run.json differs from this one (None: it does not)."""
    if old.get("checkpoint", {}).get("digest") != new["checkpoint"]["digest"]:
        return f"another checkpoint ({old.get('checkpoint', {}).get('path', '?')})"
    if old.get("codec") != new["codec"]:
        return f"--codec {old.get('codec') or '(recorded)'}, not {new['codec'] or '(recorded)'}"
    for key, value in new["settings"].items():
        if key not in RUN_ONLY and old.get("settings", {}).get(key) != value:
            return f"{key} {old.get('settings', {}).get(key)}, not {value}"
    return None


def earlier_outputs(out: Path, record: dict, overwrite: bool) -> list[dict]:
    """The results.jsonl lines an earlier run into OUT left, when it generated with `record`'s checkpoint and
    settings; SodaError when it did not (unless `overwrite`, which deletes them and their wavs)."""
    lines = read_lines(out)
    try:
        old = json.loads((out / RUN).read_text(encoding="utf-8"))
    except FileNotFoundError:
        old = None if not lines else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        old = {}
    differs = None if old is None else (_difference(old, record) if old else "settings not recorded")
    if differs and not overwrite:
        raise SodaError(f"--out {out}: holds outputs generated with {differs}; use another --out, or --overwrite "
                        f"to replace them")
    if not overwrite:
        return lines
    for line in lines:
        wav = Path(line["wav"]) if line.get("wav") else None
        if wav is not None and wav.parent.resolve() == out.resolve():
            wav.unlink(missing_ok=True)
    for name in (RESULTS, SUMMARY, RUN):
        (out / name).unlink(missing_ok=True)
    return []


def result_line(r: Result, row: dict, index: int, wav: Path | None) -> dict:
    return {"id": r.id, "task": r.task, "ended": r.ended, "terminated": r.terminated, "text": r.text,
            **({"source_text": r.source_text} if r.source_text else {}),
            "wav": str(wav) if wav else None, "seconds": round(r.seconds, 3),
            "prompt_tokens": r.prompt_tokens, "generated_tokens": len(r.ids), "segments_ended": r.phase_endings,
            "index": index, "request": request_digest(row)}


def check_family(rows: list[dict], args, settings: GenerationSettings) -> None:
    """An encoder-projector model (`soda.audio_llm`) answers instruct and asr requests in text, greedy."""
    from soda.generate.audio_llm import check_text_only

    check_text_only(rows, args.checkpoint)
    if args.codec:
        raise SodaError(f"--codec: {args.checkpoint} is an encoder-projector model; it reads audio through Whisper, "
                        f"not a codec")
    if settings.text_temperature > 0:
        raise SodaError(f"--text-temperature {settings.text_temperature}: an encoder-projector model answers greedy "
                        f"only")


@cli_errors("soda-generate")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.greedy:
        args.temperature = args.text_temperature = 0.0
    settings = GenerationSettings(temperature=args.temperature, text_temperature=args.text_temperature,
                                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, max_seconds=args.max_seconds,
                                  cap_base_seconds=args.cap_base_seconds,
                                  cap_seconds_per_char=args.cap_seconds_per_char,
                                  max_text_tokens=args.max_text_tokens, silence_seconds=args.silence_seconds,
                                  use_cache=not args.no_cache, batch_size=args.batch_size)
    rows = read_requests(Path(args.input)) if args.task == "batch" else [single_request(args)]
    family = encoder_projector_source(args.checkpoint) is not None
    if family:  # text only, greedy: refused before anything is loaded
        check_family(rows, args, settings)
    out: Path = args.out
    record = {"checkpoint": model_fingerprint(args.checkpoint), "codec": args.codec,
              "settings": {k: v for k, v in vars(settings).items() if k != "silence_codes"}}
    earlier = earlier_outputs(out, record, args.overwrite)  # before loading the model: a refusal is quick

    from soda.checkpoints import load_encoder_projector, load_model
    from tokenize_audio.shards import atomic_write_json, atomic_write_text

    progress = args.task == "batch" and not args.quiet
    if family:
        from soda.generate.audio_llm import generate_text

        model = load_encoder_projector(args.checkpoint, device=args.device)
        source, codec, codec_label = model.source, None, "none (encoder-projector: text outputs only)"
    else:
        loaded = load_model(args.checkpoint, device=args.device, codec=args.codec, hierarchical=True)
        codec = loaded.load_codec()
        source, codec_label = loaded.source, loaded.codec_label
    digests = [request_digest(row) for row in rows]
    done = {line["id"]: line for line in earlier
            if not line.get("wav") or Path(line["wav"]).is_file()}  # a line is written after its wav
    kept = {n: done[row["id"]] for n, row in enumerate(rows)
            if row["id"] in done and done[row["id"]].get("request") == digests[n]}
    todo = [n for n in range(len(rows)) if n not in kept]
    if family:  # its audio is read a batch at a time, as it is answered
        outputs = generate_text(model, [rows[n] for n in todo], settings.max_text_tokens, settings.batch_size, progress)
    else:
        requests = [to_request(rows[n], codec) for n in todo]  # every input checked before anything is generated
        if is_hierarchical(loaded):  # soda.hierarchical's family: the same requests, plans, stops and Results
            from soda.generate.hierarchical import generate_hierarchical_iter

            outputs = generate_hierarchical_iter(loaded.model, loaded.vocab, requests, settings, codec, progress)
        else:
            outputs = generate_iter(loaded, requests, settings, codec, progress=progress)
    if kept:
        print(f"soda-generate: {len(kept)} of {len(rows)} requests already done in {out}; generating the other "
              f"{len(todo)}", file=sys.stderr)
    atomic_write_json(out / RUN, {**record, "model": source, "codec_label": codec_label})
    # results.jsonl starts as the kept lines (a half-written last line of a killed run is gone), then grows
    atomic_write_text(out / RESULTS, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in kept.values()))
    lines = dict(kept)
    start = time.perf_counter()
    with open(out / RESULTS, "a", encoding="utf-8") as results_file:
        for i, r in outputs:
            n = todo[i]
            wav = None
            if r.wave is not None:
                wav = out / f"{r.id}.wav"
                write_wave(wav, r.wave, codec.sample_rate)
            lines[n] = result_line(r, rows[n], n, wav)
            if family:  # its generate does not count tokens
                lines[n].update(prompt_tokens=None, generated_tokens=None)
            results_file.write(json.dumps(lines[n], ensure_ascii=False) + "\n")
            results_file.flush()
            os.fsync(results_file.fileno())
    wall = time.perf_counter() - start

    ordered = [lines[n] for n in range(len(rows))]
    atomic_write_text(out / RESULTS, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in ordered))
    fresh = [lines[n] for n in todo]
    summary = {**summarize([Result(x["id"], x["task"], x["ended"], seconds=x["seconds"]) for x in ordered]),
               "generated_now": len(fresh), "kept_from_earlier_runs": len(kept), "wall_seconds": round(wall, 3),
               "audio_seconds_per_wall_second": round(sum(x["seconds"] for x in fresh) / wall, 3) if wall else None,
               "model": source, "checkpoint": record["checkpoint"], "codec": codec_label,
               "settings": record["settings"]}
    atomic_write_json(out / SUMMARY, summary)

    for x in ordered if args.task != "batch" else []:
        what = f"{x['seconds']:.2f} s -> {x['wav']}" if x["wav"] else repr(x["text"])
        if x["wav"] and x["text"]:
            what = f"{x['text']!r}, {what}"
        print(f"{x['id']}: {what} (ended: {x['ended']})")
    endings = ", ".join(f"{k} {v}" for k, v in summary["ended"].items() if v)
    print(f"{len(ordered)} outputs, {summary['termination_rate']:.0%} stopped by the model ({endings}); "
          f"codec: {codec_label}; wrote {out}/results.jsonl, summary.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
