"""`soda-tokenize`: speech corpora -> interleaved token shards; `soda-tokenize decode`: shards -> WAV + text."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from pathlib import Path

from tokenize_audio.errors import SodaError, cli_errors

EPILOG = """\
inputs (any mix):
  DIR                 audio files (.flac .wav .ogg .mp3 ...) with same-stem .txt or LibriSpeech *.trans.txt
                      transcripts; a recording = the folder holding the files, ordered by file name
  FILE.jsonl          manifest rows {"audio", "text", "id"?, "recording"?, "start"?, "end"?} (paths relative
                      to the manifest); a recording defaults to the audio file, segments ordered by start
  hf:NAME[:CONFIG]:SPLIT   a Hugging Face dataset (hub id or save_to_disk directory) with audio + text columns
  soda:PATH | soda:hf:NAME[:CONFIG]:SPLIT   SODA's released pre-tokenized data: parquet files (a file, glob or
                      directory) or a dataset (hub ids streamed) whose text column holds one document per row as a
                      SODA string; converted to the same ids SODA's tokenizer gives (no codec runs). Bad rows are
                      skipped with a reason; --workers processes convert it; not mixed with other inputs
  FILE.txt | FILE.jsonl   text for the text-only share: paragraphs separated by blank lines, or {"text"} rows

codecs:
  mimi (kyutai/mimi, SODA's codec), encodec (facebook/encodec_24khz), mimi:DIR or encodec:DIR for local
  weights, and the offline random-weight test codecs mimi:random and encodec:random (labelled as such in
  the manifest; mimi:random-full has the real codec's size).

text tokenizers:
  llama3 (SODA's ids exactly), a tokenizer.json file or directory, a hub id, or offline: bytes (256 byte
  ids + BOS/EOS) or bpe:N (byte-level BPE with N ids trained on the corpus text, split
  by Llama-3's pre-tokenizer regex).

engines:
  local (default) encodes in this process. --engine ray runs the same plan on Ray Data (pip install '.[ray]'):
  audio is read on CPU tasks and encoded by an actor pool (one actor per GPU, or --cpu-workers on CPU); shards
  are identical to a local run. Without Ray, --part I/N encodes every N-th planned shard (a SLURM job array
  into one --out); the last part to finish writes manifest.json, or run `soda-tokenize --finalize DIR`.

Re-running with the same --out resumes: finished shards are kept. Unusable items (unreadable or truncated
audio, empty transcripts, missing files, ...) are skipped and listed in manifest.json under "skipped".
Shards are read as data only (token arrays and JSON, never pickles), so decoding a shard from elsewhere is safe.

examples:
  soda-tokenize demo/corpus/speech demo/corpus/text/kjv_proverbs.txt --out runs/demo-tokens \\
      --codec mimi:random --text-tokenizer bytes
  soda-tokenize /data/LibriSpeech/train-clean-100 --out tokens/ls100 --codec mimi --text-tokenizer llama3
  soda-tokenize decode tokens/ls100 --document 0 --out decoded/
"""


def build_parser() -> argparse.ArgumentParser:
    from tokenize_audio.codecs import DEFAULT_ENCODE_CHUNK_SECONDS

    p = argparse.ArgumentParser(
        prog="soda-tokenize", allow_abbrev=False,
        description="Turn speech corpora (audio + transcripts) and text into interleaved semantic/acoustic/text "
                    "token shards (webdataset .tar) with a vocabulary and manifest.json. "
                    "Subcommand: `soda-tokenize decode --help` turns shard documents back into WAV and text.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="directories, JSONL manifests, hf:... datasets, text files")
    p.add_argument("--out", required=True, type=Path, help="output directory (re-running resumes into it)")
    p.add_argument("--codec", default="mimi", help="codec (default: mimi = kyutai/mimi); see below")
    p.add_argument("--codebooks", type=int, default=8, help="codebooks kept per frame (default 8; 1 = semantic only)")
    p.add_argument("--text-tokenizer", default="llama3", help="text tokenizer (default: llama3); see below")
    p.add_argument("--formats", default="text-first,audio-first",
                   help="comma list of text-first, audio-first, audio-only, text-only (default: both like SODA)")
    p.add_argument("--validation-fraction", type=float, default=0.002,
                   help="share of recordings held out by hashing their id (default 0.002; at least one)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="threads decoding audio (soda: inputs: processes converting strings)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-seconds", type=float, default=None,
                   help="padded audio seconds per encoder batch (default: 120 on CUDA, 5 on CPU, where "
                        "large batches measured slower; see benchmarks/RESULTS.md)")
    p.add_argument("--encode-chunk-seconds", type=float, default=DEFAULT_ENCODE_CHUNK_SECONDS,
                   help=f"encode audio longer than this in chunks of this length (default "
                        f"{DEFAULT_ENCODE_CHUNK_SECONDS:g}; rounded down to whole codec frames), so memory does not "
                        f"grow with the file; Mimi's codes are identical to one pass, EnCodec's differ only on "
                        f"rare near-ties")
    p.add_argument("--keep-truncated", action="store_true",
                   help="keep audio files holding less audio than their header declares (by default they are "
                        "skipped: their transcript covers audio that is missing)")
    p.add_argument("--recordings-per-shard", type=int, default=64, help="speech recordings per shard (default 64)")
    p.add_argument("--texts-per-shard", type=int, default=1000,
                   help="text documents (soda: inputs: rows) per shard (default 1000)")
    p.add_argument("--text-column",
                   help="hf: and soda: inputs: transcript / SODA-string column (default: text, transcript, sentence, ...)")
    p.add_argument("--audio-column", help="hf: inputs: audio column (default: the Audio feature)")
    p.add_argument("--recording-column",
                   help="hf: inputs: column grouping rows into recordings (soda: inputs: default a hash of the "
                        "document's text and audio spans, the same for its text-first and audio-first forms)")
    p.add_argument("--overwrite", action="store_true", help="replace shards in --out made with other settings")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: Ray Data tasks and a codec actor pool")
    p.add_argument("--address", help="--engine ray: cluster to join (auto, HOST:PORT); default: start a local "
                                     "Ray instance and stop it at the end")
    p.add_argument("--gpus-per-worker", type=float, default=1.0,
                   help="--engine ray: GPUs per codec actor (default 1: one actor per GPU)")
    p.add_argument("--cpu-workers", type=int, default=1,
                   help="--engine ray without GPUs: codec actors, one CPU each (default 1; leave cores for reading)")
    p.add_argument("--part", type=_part, metavar="I/N",
                   help="encode only part I of N (every N-th planned shard), e.g. $((SLURM_ARRAY_TASK_ID+1))/N; "
                        "the last part to finish writes the manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def build_decode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soda-tokenize decode", allow_abbrev=False,
        description="Turn documents of a tokenized corpus back into WAV files and transcripts "
                    "(one folder per document: NNN-audio.wav / NNN-text.txt per segment, plus document.json).",
    )
    p.add_argument("source", type=Path, help="an --out directory of soda-tokenize, or one of its .tar shards")
    p.add_argument("--out", required=True, type=Path, help="where to write the decoded documents")
    p.add_argument("--document", type=int, default=0, help="index of the first document to decode (default 0)")
    p.add_argument("--count", type=int, default=1, help="how many documents to decode (default 1)")
    p.add_argument("--recording", help="decode the documents of this recording id instead")
    p.add_argument("--codec", help="codec to decode with (default: the one in manifest.json)")
    p.add_argument("--device", default="auto")
    return p


def _part(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N with 1 <= I <= N, e.g. 3/8")
    return int(match[1]), int(match[2])


def _formats(text: str) -> tuple[str, ...]:
    from tokenize_audio.documents import FORMATS

    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise SodaError(f"--formats {text!r}: unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(formats))


@cli_errors("soda-tokenize", interrupted="finished shards are kept; re-run the same command to resume")
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "decode":
        return decode_main(argv[1:])
    if argv and argv[0] == "--finalize":
        return finalize_main(argv[1:])
    args = build_parser().parse_args(argv)
    return tokenize_args(args)


def finalize_main(argv) -> int:
    from tokenize_audio.pipeline import finalize

    p = argparse.ArgumentParser(prog="soda-tokenize --finalize", allow_abbrev=False,
                                description="Write manifest.json of an --out directory whose --part jobs all finished.")
    p.add_argument("out", type=Path, metavar="DIR", help="the --out directory of the parts")
    args = p.parse_args(argv)
    manifest = finalize(args.out)
    _print_summary(manifest, args.out, 0, 0)
    return 0


def tokenize(inputs: list, out: Path, **options) -> int:
    """soda-tokenize as a function (soda-train's demo data): INPUTS into OUT, `options` by flag name (e.g.
    codec="mimi:random", text_tokenizer="bytes", quiet=True), soda-tokenize's defaults for the rest. Errors raise."""
    args = build_parser().parse_args(["--out", str(out), "--", *map(str, inputs)])  # the defaults, as the CLI's
    unknown = sorted(set(options) - set(vars(args)))
    if unknown:
        raise TypeError(f"tokenize(): unknown option(s) {', '.join(unknown)}")
    vars(args).update(options)
    return tokenize_args(args)


def tokenize_args(args) -> int:
    from tokenize_audio.codecs import load_codec
    from tokenize_audio.encoding import default_batch_seconds
    from tokenize_audio.pipeline import (MANIFEST, SETTINGS, ShardEncoder, TokenizeSettings, check_settings,
                                         finalize, plan_shards, select_part, unfinished, write_plan)
    from tokenize_audio.shards import atomic_write_json
    from tokenize_audio.sources import read_inputs
    from tokenize_audio.vocab import Vocabulary, load_text_tokenizer

    formats = _formats(args.formats)
    if any(i.startswith("soda:") for i in args.inputs):
        return _import_soda(args)
    if not 0 <= args.validation_fraction < 1:
        raise SodaError(f"--validation-fraction {args.validation_fraction}: must be in [0, 1)")
    for name in ("codebooks", "recordings_per_shard", "texts_per_shard", "workers", "cpu_workers"):
        if getattr(args, name) < 1:
            raise SodaError(f"--{name.replace('_', '-')} must be at least 1")
    if not args.encode_chunk_seconds > 0:
        raise SodaError(f"--encode-chunk-seconds {args.encode_chunk_seconds}: must be positive")
    if args.engine == "ray":
        from tokenize_audio.ray_engine import import_ray

        import_ray()  # before any work: without Ray, one line saying how to install it
    if args.out.exists() and not args.out.is_dir():
        raise SodaError(f"--out {args.out} exists and is not a directory")

    corpus = read_inputs(args.inputs, text_column=args.text_column, audio_column=args.audio_column,
                         recording_column=args.recording_column)
    # With Ray the codec actors hold the GPUs; this process needs only the codec's description.
    codec = load_codec(args.codec, args.codebooks, "cpu" if args.engine == "ray" else args.device,
                       encode_chunk_seconds=args.encode_chunk_seconds)
    if codec.random:
        print(f"note: {codec.describe()['label']}", file=sys.stderr)
    settings = TokenizeSettings(codec.describe(), args.text_tokenizer, formats, args.validation_fraction,
                        args.recordings_per_shard, args.texts_per_shard, args.keep_truncated)
    args.out.mkdir(parents=True, exist_ok=True)
    same = check_settings(args.out, settings, args.overwrite)

    if same and (args.out / "vocab.json").is_file():
        vocab = Vocabulary.load(args.out)  # resume: keep exactly the ids the finished shards use
    else:
        texts = (t for t in [u.text for u in corpus.utterances] + [d.text for d in corpus.texts])
        text_tok = load_text_tokenizer(args.text_tokenizer, texts)
        vocab = Vocabulary.build(text_tok, codec.n_codebooks, codec.codebook_size, codec.semantic_codebooks,
                                 args.text_tokenizer)
        vocab.save(args.out)
    atomic_write_json(args.out / SETTINGS, settings.to_dict())

    plans = plan_shards(corpus, settings)
    write_plan(args.out, plans, settings, codec, corpus)
    _remove_stale_shards(args.out, {p.name for p in plans})
    mine = select_part(plans, *args.part) if args.part else plans
    if args.part and unfinished(args.out, mine, settings)[0]:
        (args.out / MANIFEST).unlink(missing_ok=True)  # no longer true of --out; the last part writes it anew
    if args.engine == "ray":
        from tokenize_audio.ray_engine import CodecSpec, run_ray

        todo, done = unfinished(args.out, mine, settings)
        spec = CodecSpec(args.codec, args.codebooks, args.device, args.encode_chunk_seconds, codec.sample_rate,
                         codec.samples_per_frame)
        run_ray(todo, spec, settings, args.out, args.batch_seconds, address=args.address,
                gpus_per_worker=args.gpus_per_worker, cpu_workers=args.cpu_workers, progress=not args.quiet)
        reused = len(done)
    else:
        batch_seconds = args.batch_seconds or default_batch_seconds(codec)
        encoder = ShardEncoder(codec, vocab, settings, args.out, args.workers, batch_seconds, not args.quiet)
        reused = encoder.run(mine)[1]
    manifest = finalize(args.out, required=args.part is None)  # None while other parts are still running
    if manifest is None:
        print(f"part {args.part[0]}/{args.part[1]} done ({len(mine)} of {len(plans)} shards in {args.out}); "
              f"the last part to finish writes manifest.json, or run: soda-tokenize --finalize {args.out}")
        return 0
    _print_summary(manifest, args.out, reused, len(plans))
    return 0


def _import_soda(args) -> int:
    """soda: inputs: pre-tokenized SODA strings, converted without a codec (tokenize_audio/soda_strings.py)."""
    from tokenize_audio.soda_strings import import_soda

    if getattr(args, "part", None) or getattr(args, "engine", "local") != "local":
        raise SodaError("--part and --engine ray are for audio inputs; soda: inputs are converted by --workers "
                        "processes")
    if not 0 <= args.validation_fraction < 1:
        raise SodaError(f"--validation-fraction {args.validation_fraction}: must be in [0, 1)")
    for name in ("texts_per_shard", "workers"):
        if getattr(args, name) < 1:
            raise SodaError(f"--{name.replace('_', '-')} must be at least 1")
    if args.out.exists() and not args.out.is_dir():
        raise SodaError(f"--out {args.out} exists and is not a directory")
    manifest = import_soda(args)
    reused, units = manifest.pop("_reused_units"), manifest.pop("_units")
    _remove_stale_shards(args.out, manifest.pop("_planned"))
    if manifest["documents"] and not manifest["shards"]["validation"] and args.validation_fraction > 0:
        print(f"warning: no recording hashed below --validation-fraction {args.validation_fraction}: the validation "
              f"split is empty (an import streams its rows, so it cannot hold out a minimum of one)")
        manifest = manifest | {"validation_fraction": 0}  # the summary's own warning would blame skipped items
    _print_summary(manifest, args.out, reused, units)
    return 0


_SHARD_FILE = re.compile(r"^(train|validation)-(speech|text)-\d{5}\.(tar|json)$")


def _remove_stale_shards(out: Path, planned: set[str]) -> None:
    """Shards left by an earlier plan (other inputs or settings) would make the directory lie."""
    for path in out.iterdir():
        if _SHARD_FILE.match(path.name) and path.name.rsplit(".", 1)[0] not in planned:
            path.unlink()


def _print_summary(m: dict, out: Path, reused: int, planned: int) -> None:
    tok = m["tokens"]
    documents = {split: sum(s["documents"] for s in m["shard_stats"] if s["split"] == split)
                 for split in ("train", "validation")}
    empty = [kind for kind, lists in m["shards_by_kind"].items() if lists["train"] and not lists["validation"]]
    lines = [
        f"wrote {out}: {m['documents']} documents from {m['recordings']} recordings/texts, "
        f"{m['utterances']} utterances, {m['audio_seconds'] / 3600:.2f} h audio",
        f"tokens: {tok['total']:,} (text {tok['text']:,}, semantic {tok['semantic']:,}, "
        f"acoustic {tok['acoustic']:,}, special {tok['special']:,}); vocabulary {m['vocab_size']:,}",
        "shards: " + ", ".join(f"{len(m['shards'][split])} {split} ({documents[split]} documents)"
                               for split in ("train", "validation"))
        + (f" ({reused} of {planned} kept from an earlier run)" if reused else ""),
        f"codec: {m['codec']['label']}",
    ]
    if m["skipped"]:
        lines.append(f"skipped {len(m['skipped'])} items (reasons in manifest.json), e.g. "
                     f"{m['skipped'][0]['path']}: {m['skipped'][0]['reason']}")
    if not m["documents"]:
        lines.append("warning: no documents were written")
    elif empty and m["validation_fraction"] > 0:  # held-out items exist whenever a kind has any, so all were skipped
        what = f" of the {' and '.join(empty)} documents" if m["shards"]["validation"] else ""
        lines.append(f"warning: the validation split{what} is empty (every held-out item was skipped); "
                     "soda-train will report no validation loss on it")
    print("\n".join(lines))


# --------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------
def _safe_name(text, default: str) -> str:
    """A file-name part from shard contents: letters, digits, `_` and `-` only, so no `../` or `/`
    in a shard made by someone else can place a file outside --out."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", str(text or "")).strip("_")[:64]
    return name or default


def decode_main(argv) -> int:
    import soundfile as sf

    from tokenize_audio.codecs import load_codec
    from tokenize_audio.documents import split_segments
    from tokenize_audio.shards import atomic_write_bytes, atomic_write_json, atomic_write_text, read_shard
    from tokenize_audio.vocab import Vocabulary

    args = build_decode_parser().parse_args(argv)
    src = args.source
    if not src.exists():
        raise SodaError(f"{src} does not exist")
    root = src if src.is_dir() else src.parent
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise SodaError(f"{root}: no manifest.json (not a soda-tokenize output directory)")
    manifest = json.loads(manifest_path.read_text())
    vocab = Vocabulary.load(root)
    shards = [src] if src.is_file() else [root / f for f in manifest["shards"]["train"] + manifest["shards"]["validation"]]

    wanted = []
    index = 0
    for shard in shards:
        if not shard.is_file():
            raise SodaError(f"shard {shard} is missing")
        for key, ids, meta in read_shard(shard):
            take = meta.get("recording") == args.recording if args.recording else \
                args.document <= index < args.document + args.count
            if take:
                wanted.append((index, key, ids, meta))
            index += 1
    if not wanted:
        what = f"recording {args.recording!r}" if args.recording else f"document {args.document} (there are {index})"
        raise SodaError(f"{src}: no {what}")

    codec = None
    for index, key, ids, meta in wanted:
        folder = args.out / f"doc-{index:06d}-{_safe_name(meta.get('format'), 'doc')}"
        folder.mkdir(parents=True, exist_ok=True)
        texts = []
        segments = split_segments(vocab, ids)
        for n, seg in enumerate(segments):
            if seg.kind == "text":
                text = vocab.decode_text(seg.ids)
                texts.append(text)
                atomic_write_text(folder / f"{n:03d}-text.txt", text + "\n")
            elif len(seg.ids):
                if codec is None:
                    codec = load_codec(args.codec or manifest["codec"]["spec"], vocab.n_codebooks, args.device)
                wave = codec.decode(vocab.ids_to_codes(seg.ids))
                buf = io.BytesIO()
                sf.write(buf, wave, codec.sample_rate, format="WAV", subtype="PCM_16")
                atomic_write_bytes(folder / f"{n:03d}-audio.wav", buf.getvalue())
        atomic_write_json(folder / "document.json", {"key": key, "tokens": int(len(ids)), **meta})
        atomic_write_text(folder / "transcript.txt", "\n".join(texts) + "\n")
        print(f"{folder}: {len(segments)} segments ({meta.get('recording')}, {meta.get('format')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
