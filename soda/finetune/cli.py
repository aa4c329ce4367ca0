"""`soda-finetune`: continue training a checkpoint on task documents, with soda-train's machinery.

    soda-finetune s2st --init-from CKPT --data pairs.tsv --out RUN [--target-only-loss]
    soda-finetune docs --init-from CKPT --data TOKENIZED_DIR --out RUN [--loss-after text_end]
    soda-finetune instruct --init-from CKPT --data tasks.jsonl --data mcq=audiomcq.json --out RUN
    soda-finetune eval-s2st CKPT --data pairs.tsv --out DIR          # = soda-eval --tasks s2st
    soda-finetune grpo --init-from RUN_SFT --data strong.json --out RUN   # GRPO, AudioMCQ's MCQ rewards
    soda-finetune instruct --architecture encoder-projector --encoder openai/whisper-medium \
        --llm tiiuae/Falcon3-1B-Instruct --data tasks.jsonl --out RUN    # the second model family
    soda-finetune merge RUN --out MERGED                                 # its LoRA folded into the LLM

`s2st` turns a CVSS-style manifest into SODA's speech-to-speech translation documents (encoded with the
checkpoint's own codec and vocabulary: `tokenize_audio.s2st`) in RUN/data, then trains on them; `docs` trains on
shards made by `soda-tokenize` (e.g. `--formats audio-first` for ASR-only or `text-first` for TTS-only
fine-tuning), after checking they share the checkpoint's vocabulary and codec; `instruct` turns audio instruction
and multiple-choice files into instruction documents, one shard directory per source, with a data report and a
contamination check (`soda.finetune.instruct_data`), and trains on the responses only. Both hand a `TrainConfig`
to `soda.train.cli.train`: the same Lightning run as pre-training (resume, logging, strategies, checkpoints,
HF export), only with fine-tuning defaults: SODA's CVSS-T recipe (`FINETUNE_DEFAULTS`, spelled out in
configs/finetune-s2st.yaml), five epochs of the data for s2st and one for docs unless --tokens or --epochs
say otherwise. `grpo` (`soda.finetune.grpo`) is reinforcement learning on multiple-choice audio questions after
`instruct`, its own Lightning run on soda-train's callbacks. `instruct --architecture encoder-projector` trains
the second model family (`soda.audio_llm`: frozen Whisper, projector, LoRA'd LLM) on the same manifests
(`soda.finetune.encoder_projector`), and `merge` folds its LoRA into the LLM.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from soda.finetune.encoder_projector import (
    ARCHITECTURE,
    add_family_arguments,
    add_merge_parser,
    merge_command,
    refuse_native_family_flags,
    run_encoder_projector,
)
from soda.finetune.prepare import init_model_dir, init_target, summarize_skips, wait_for
from soda.train.cli import (
    check_run_directory,
    flag_values,
    resolve_config,
    resolve_resume,
    run_directory,
    stop_on_signals,
    train,
)
from soda.train.config import TrainConfig, add_train_arguments, validate
from soda.train.run import is_rank_zero
from tokenize_audio.errors import SodaError, cli_errors
from tokenize_audio.shards import atomic_write_json

# SODA's S2ST fine-tuning recipe (CVSS-T; configs/finetune-s2st.yaml spells it out): sequences of 2048, batch 64,
# LR 2e-5 cosine to 0 after 3% warm-up, cautious AdamW (0.9, 0.999), eps 1e-8, AdamC weight decay 0.01, clip 1,
# z-loss 1e-4, 5 epochs. Other settings keep soda-train's.
FINETUNE_DEFAULTS = {"seq_len": 2048, "batch_tokens": 64 * 2048, "lr": 2e-5, "schedule": "cosine", "warmup": 0.03,
                     "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "weight_decay_mode": "adamc",
                     "cautious": True, "grad_clip": 1.0, "z_loss": 1e-4, "epochs": 5.0,
                     "val_every": 200, "val_batches": 20, "ckpt_every": 500, "log_every": 10,
                     "sample_every": 0}  # pre-training's sample prompts (TTS, continuation, ASR) say little here
# `docs` takes the same recipe over one pass of its data (any soda-tokenize output: often far larger than CVSS-T).
DOCS_DEFAULTS = FINETUNE_DEFAULTS | {"epochs": 1.0}
# `instruct`: the same recipe with SODA's 4096 context (a 30 s clip is 3,000 Mimi tokens) and AudioMCQ's SFT
# schedule (2 epochs, 5% warm-up); Falcon3-Audio's hyperparameters are not published.
INSTRUCT_DEFAULTS = FINETUNE_DEFAULTS | {"seq_len": 4096, "batch_tokens": 32 * 4096, "epochs": 2.0, "warmup": 0.05}
# soda-train flags that do not apply: the model comes from --init-from, which soda-finetune defines itself.
MODEL_FLAGS = {"--size", "--sweep-width", "--width", "--layers", "--heads", "--kv-heads", "--head-dim", "--ffn",
               "--init-from", "--dry-run", "--mfu", "--vocab",
               # soda-train's model family: fine-tuning starts from a flat --init-from model (instruct's own
               # --architecture picks its encoder-projector family)
               "--architecture", "--depth-width", "--depth-layers", "--loss-weights"}
S2ST_ONLY = {"--data", "--val-data", "--mix", "--loss-after"}  # s2st makes its own data; --target-only-loss
INSTRUCT_ONLY = {"--data", "--val-data", "--loss-after"}  # instruct makes its own data, scored after the instruction
DATA_DIR, REPORT = "data", "data_report.json"


def say(message: str) -> None:
    print(f"soda-finetune: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soda-finetune", allow_abbrev=False,
        description="Fine-tune a checkpoint (run directory, .ckpt, Hugging Face directory or hub id) with "
                    "soda-train's machinery and SODA's fine-tuning recipe (seq 2048, batch 64, LR 2e-5 cosine, "
                    "3% warm-up, cautious AdamW betas 0.9/0.999, eps 1e-8, AdamC weight decay 0.01, clip 1, z-loss "
                    "1e-4; 5 epochs for s2st); every soda-train recipe, hardware and logging flag applies.",
        epilog="examples:\n"
               "  soda-finetune s2st --init-from runs/600m --data cvss_t/fr/train.tsv --out runs/s2st-fr "
               "--target-only-loss\n"
               "  soda-finetune s2st --out runs/s2st-fr --resume\n"
               "  soda-finetune docs --init-from runs/600m --data tok/librispeech-asr --out runs/asr\n"
               "  soda-finetune instruct --init-from runs/600m --data asqa=open_asqa.jsonl --data mcq=audiomcq.json "
               "--temperature 2 --eval-sets mmau-test-mini.json --out runs/instruct\n"
               "  soda-finetune eval-s2st runs/s2st-fr --data cvss_t/fr/test.tsv --out eval/s2st-fr",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{s2st,docs,instruct,eval-s2st,grpo,merge}")

    s = sub.add_parser("s2st", allow_abbrev=False, help="speech-to-speech translation from a CVSS-style manifest",
                       description="Build SODA's S2ST documents from a manifest (TSV with a header, or JSONL: "
                                   "source_audio, source_text, source_language, target_text, target_audio; paths "
                                   "relative to the manifest) into RUN/data and fine-tune on them.")
    _common(s, "MANIFEST", FINETUNE_DEFAULTS)
    g = s.add_argument_group("S2ST data")
    g.add_argument("--data", dest="manifest", metavar="MANIFEST", help="CVSS-style pairs manifest (.tsv or .jsonl)")
    g.add_argument("--codec", help="codec to encode audio with (default: the one recorded with the checkpoint)")
    g.add_argument("--device", default="auto", help="device for encoding audio (auto: GPU when present)")
    g.add_argument("--source-language", help="source language for rows without one (e.g. fr)")
    g.add_argument("--target-only-loss", action="store_true",
                   help="score only the target (target text, target speech, EOS), not the source")
    g.add_argument("--validation-fraction", type=float, default=0.02,
                   help="pairs held out for validation loss, chosen by hashing their id (default 0.02; 0 for none)")
    g.add_argument("--pairs-per-shard", type=int, default=1000)
    g.add_argument("--prepare-only", action="store_true", help="write RUN/data and stop (e.g. before a multi-node "
                                                               "launch)")
    add_train_arguments(s, skip=MODEL_FLAGS | S2ST_ONLY, helps=_finetune_helps(FINETUNE_DEFAULTS))

    d = sub.add_parser("docs", allow_abbrev=False,
                       help="any soda-tokenize shards (e.g. ASR-only or TTS-only documents)",
                       description="Fine-tune on soda-tokenize output (--data as in soda-train); the data must share "
                                   "the checkpoint's vocabulary and codec.")
    _common(d, "DIR", DOCS_DEFAULTS)
    add_train_arguments(d, skip=MODEL_FLAGS, helps=_finetune_helps(DOCS_DEFAULTS))

    i = sub.add_parser(
        "instruct", allow_abbrev=False, help="audio instruction tuning (Falcon3-Audio's single mixed-task run)",
        description="Turn audio instruction and multiple-choice files into instruction documents (BOS "
                    "<|audio_start|>A<|audio_end|><|text_start|>instruction<|text_end|><|text_start|>response"
                    "<|text_end|> EOS, encoded with the checkpoint's codec), one shard directory per source in "
                    "RUN/data, and fine-tune on the responses only, in one mixed run. soda-generate's instruct task "
                    "asks the tuned model the same way; soda-eval --tasks mcq --mcq-mode generate scores it.",
        epilog="--data rows (JSON list or JSONL; audio paths relative to the file):\n"
               "  {\"audio\": \"a.wav\", \"instruction\": \"Describe the sound.\", \"response\": \"A dog barks.\", "
               "\"task\": \"caption\", \"source\": \"clotho\"}\n"
               "  MMAU/MMAR/MMSU/AudioMCQ questions: question, choices (or choice_a..), answer -> AudioMCQ's "
               "prompt and <answer>OPTION</answer>\n"
               "  {\"audio\": \"a.wav\", \"question\": \"...\", \"answer\": \"...\"}   (free-form QA)\n"
               "A row's source field (else the file's NAME) is the source it trains in; --mix weights sources by "
               "token share.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(i, "FILE", INSTRUCT_DEFAULTS)
    g = i.add_argument_group("instruction data")
    g.add_argument("--data", dest="instruct_data", action="append", metavar="[NAME=]FILE",
                   help="instruction or MCQ rows (.json/.jsonl, or hf:NAME[:CONFIG]:SPLIT); repeat for more sources")
    g.add_argument("--temperature", type=float,
                   help="without --mix: weight sources by token count^(1/T) (default 1: natural proportions; "
                        "larger flattens toward uniform)")
    g.add_argument("--cap", help="at most N items per source (N) or per named source (NAME=N,NAME=N): a seeded "
                                 "choice")
    g.add_argument("--eval-sets", action="append", default=[], metavar="FILE",
                   help="evaluation files (MCQ or instruction rows) to check the training clips against, by file "
                        "id and by audio-token hash; repeatable")
    g.add_argument("--contamination", choices=("refuse", "warn", "drop"), default="refuse",
                   help="training clips found in --eval-sets: refuse to train (default), warn, or drop those items")
    g.add_argument("--codec", help="codec to encode audio with (default: the one recorded with the checkpoint)")
    g.add_argument("--device", default="auto", help="device for encoding audio (auto: GPU when present)")
    g.add_argument("--validation-fraction", type=float, default=0.02,
                   help="clips held out for validation loss, chosen by hashing them (default 0.02; 0 for none)")
    g.add_argument("--items-per-shard", type=int, default=1000)
    g.add_argument("--prepare-only", action="store_true", help="write RUN/data and the report, and stop")
    add_train_arguments(i, skip=MODEL_FLAGS | INSTRUCT_ONLY, helps=_finetune_helps(INSTRUCT_DEFAULTS))
    add_family_arguments(i)

    e = sub.add_parser("eval-s2st", allow_abbrev=False,
                       help="ASR-BLEU, text BLEU, speaker similarity and termination rate "
                                         "(soda-eval --tasks s2st)")
    e.add_argument("checkpoint", help="run directory, .ckpt, Hugging Face directory or hub id")
    e.add_argument("--data", required=True, metavar="MANIFEST", help="CVSS-style manifest of test pairs (TSV/JSONL)")
    e.add_argument("--out", required=True, help="directory for results.json, results.md, items/ and the WAVs")
    e.add_argument("--asr", default="whisper", help="ASR backend: whisper[:MODEL], pocketsphinx, self")
    e.add_argument("--speaker", default="wavlm", help="speaker encoder: wavlm[:MODEL], resemblyzer, none")
    e.add_argument("--source-text", choices=("generated", "given"), default="generated",
                   help="generated (default): the model transcribes the source first, as SODA; given: the "
                        "manifest's transcript goes into the prompt")
    e.add_argument("--source-language", help="language code for rows without one, e.g. fr")
    e.add_argument("--max-seconds", type=float, default=30.0, help="longest target speech generated (default 30)")
    e.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    e.add_argument("--codec", help="codec spec overriding the one recorded with the checkpoint")
    e.add_argument("--limit", type=int, help="evaluate only the first N pairs")
    e.add_argument("--seed", type=int, help="sampling seed")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.add_argument("--overwrite", action="store_true",
                   help="discard the results already in --out (as soda-eval --overwrite)")
    _grpo_parser(sub)
    add_merge_parser(sub)
    return p


def _grpo_parser(sub) -> None:
    from soda.finetune.grpo import add_grpo_arguments

    g = sub.add_parser("grpo", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="GRPO with AudioMCQ's verifiable multiple-choice rewards (after instruction SFT)",
                       description="Reinforcement learning on multiple-choice audio questions (AudioMCQ's recipe): "
                                   "each step samples --generations answers per question with soda's decoder "
                                   "(temperature 1.5, top-k 4, text only, <= 128 tokens), rewards each with 2.0 x "
                                   "accuracy (the <answer>...</answer> text equals the right option, any case) + 0.5 "
                                   "x format (the answer is exactly one <answer>...</answer>), normalises the "
                                   "rewards within each question's group and takes one step of the GRPO loss with a "
                                   "k3 KL (--beta) to the frozen starting model. Questions whose audio cannot be read "
                                   "are skipped and counted in RUN/data_report.json. Defaults are AudioMCQ's grpo.sh.",
                       epilog="the weak-to-strong curriculum (AudioMCQ), one command each:\n"
                              "  soda-eval runs/base --tasks mcq --data-for mcq=train.json --split-weak-strong "
                              "--out eval/split\n"
                              "  soda-finetune instruct --init-from runs/base --data eval/split/mcq_weak.json --out "
                              "runs/sft\n"
                              "  soda-finetune grpo --init-from runs/sft --data eval/split/mcq_strong.json --out "
                              "runs/grpo\n"
                              "  soda-finetune grpo --out runs/grpo --resume      # after a stop or pre-emption\n"
                              "(mixed-to-strong: SFT on the whole train.json instead of mcq_weak.json)")
    add_grpo_arguments(g)


def _finetune_helps(defaults: dict) -> dict:
    """soda-train's help texts, with the defaults soda-finetune changes (`epochs` has its own flag here)."""
    from dataclasses import fields

    helps = {f.name: f"{f.metadata['help'] or ''} (soda-finetune default: {defaults[f.name]})".strip()
             for f in fields(TrainConfig) if f.name in defaults and f.name != "epochs"}
    return helps | {"out": "run directory (required): data/, checkpoints, logs, metrics.csv, loss.png, hf/"}


def _common(p, data_name: str, defaults: dict) -> None:
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="the model to fine-tune: run directory, .ckpt, Hugging Face directory or hub id")
    p.add_argument("--epochs", type=float, help=f"passes over the training data the schedule spans (default "
                                                f"{defaults['epochs']:g}; --tokens overrides)")
    p.add_argument("--quiet", action="store_true", help="no progress bar while encoding")


@cli_errors("soda-finetune")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "eval-s2st":
        return evaluate_s2st(args)
    if args.command == "grpo":
        from soda.finetune.grpo import run_grpo

        return run_grpo(args)
    if args.command == "merge":
        return merge_command(args)
    if args.command == "instruct" and args.architecture == ARCHITECTURE:
        return run_encoder_projector(args)
    if args.command == "instruct":
        refuse_native_family_flags(args)
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    flags = flag_values(args)
    flags.pop("architecture", None)  # instruct's --architecture native: its family flag, not soda-train's setting
    if args.command == "s2st" and args.target_only_loss:
        flags["loss_after"] = "text_end"
    if args.command == "instruct":
        flags["loss_after"] = "text_end"  # the response: everything after the instruction's <|text_end|>
    out = run_directory(flags, args.config, default="")
    if not str(out) or str(out) == ".":
        raise SodaError("give --out RUN_DIR")
    stop_on_signals(out, "soda-finetune " + args.command)
    args.resume = resolve_resume(args.resume, out)
    if args.epochs is not None and not args.epochs > 0:
        raise SodaError(f"--epochs {args.epochs:g}: must be positive (e.g. 0.5 for half the data)")
    if not args.resume:
        data = {"s2st": "manifest", "instruct": "instruct_data"}.get(args.command, "data")
        data = getattr(args, data)
        missing = [f for f, v in (("--init-from", args.init_from), ("--data", data)) if not v]
        if missing:
            raise SodaError(f"{args.command}: give {' and '.join(missing)} (or --resume a run)")
    check_run_directory(out, args.resume)  # before preparing any data
    if args.resume and flags.get("init_from"):  # the same command line again: its .ckpt was trained from RUN/init
        flags["init_from"] = init_target(flags["init_from"], out)[0]
    defaults = {"s2st": FINETUNE_DEFAULTS, "instruct": INSTRUCT_DEFAULTS}.get(args.command, DOCS_DEFAULTS)
    cfg = resolve_config(flags, out, args.resume, args.config, [] if args.resume else [defaults])
    tokens_given = "tokens" in flags or bool(args.config and "tokens" in _yaml(args.config))
    if args.command == "s2st":
        prepared = prepare_s2st(args, out, cfg.epochs or defaults["epochs"], cfg.seq_len)
        if args.prepare_only:
            return 0
    elif args.command == "instruct":
        prepared = prepare_instruct(args, cfg, out)
        if args.prepare_only:
            return 0
    else:
        prepared = prepare_docs(args, cfg, out, tokens_given)
    if not args.resume:
        cfg.init_from, cfg.data = prepared["init_from"], prepared["data"]
        if "mix" in prepared:
            cfg.mix = prepared["mix"]
        if tokens_given:
            cfg.epochs = None  # --tokens, not a number of passes, sets the schedule's length
        else:
            cfg.tokens = max(prepared["train_tokens"], cfg.batch_sequences * cfg.seq_len)
        validate(cfg)
    code = train(cfg, resume=args.resume)
    if is_rank_zero() and prepared.get("report"):
        say(prepared["report"])
    return code


def _yaml(path) -> dict:
    from soda.train.config import load_yaml

    return load_yaml(path)


LISTED_LONG = 5  # documents longer than --seq-len named in the warning (all are in the report)


def prepare_s2st(args, out: Path, epochs: float, seq_len: int) -> dict:
    """RUN/data from the manifest (kept on --resume), RUN/data_report.json; what training needs from it.

    The report records the manifest's sha256, so a --resume refuses a manifest edited in place (its run would go
    on training on the old pairs), and names the documents longer than `seq_len`: they are cut across training
    windows, so the end of such a pair (its target) is trained without the source it translates."""
    from soda.train.sources import MANIFEST
    from tokenize_audio.s2st import epochs_to_tokens, manifest_sha256, read_pairs, write_s2st_shards

    data = out / DATA_DIR
    report_file = out / REPORT
    if args.resume or not is_rank_zero():
        if not is_rank_zero():
            wait_for(report_file)
        if not (data / MANIFEST).is_file() or not report_file.is_file():
            raise SodaError(f"--resume: {data} holds no prepared data; start the run again without --resume")
        report = json.loads(report_file.read_text())
        if args.manifest and Path(args.manifest).resolve() != Path(report["manifest"]):
            raise SodaError(f"--resume: --data {args.manifest} is not the manifest this run was prepared from "
                            f"({report['manifest']})")
        recorded, source = report.get("manifest_sha256"), Path(report["manifest"])
        if recorded and source.is_file() and manifest_sha256(source) != recorded:  # a moved-away one: data is kept
            raise SodaError(f"--resume: {source} changed since {data} was prepared from it, and the run would go on "
                            f"training on the old pairs; start a new run (another --out) from the edited manifest, "
                            f"or restore it")
        manifest = json.loads((data / MANIFEST).read_text())
        return {"data": [str(data)], "init_from": report["init_from"],
                "train_tokens": epochs_to_tokens(manifest, epochs), "report": None}
    if not 0 <= args.validation_fraction < 1 or args.pairs_per_shard < 1:
        raise SodaError("--validation-fraction must be in [0, 1) and --pairs-per-shard positive")
    from soda.checkpoints import load_model

    pairs = read_pairs(args.manifest, args.source_language)
    if not pairs.pairs:
        reasons = "; ".join(sorted({s["reason"].split(":")[0] for s in pairs.skipped})) or "no rows"
        raise SodaError(f"{args.manifest}: no usable pairs ({len(pairs.skipped)} rows skipped: {reasons})")
    loaded = load_model(args.init_from, device=args.device, codec=args.codec, weights=False)  # training loads them
    codec = loaded.load_codec()
    say(f"encoding {len(pairs.pairs):,} pairs of {args.manifest} with {loaded.codec_label} into {data}")
    manifest, skipped, lengths = write_s2st_shards(pairs, loaded.vocab, codec, data, args.validation_fraction,
                                                   args.pairs_per_shard, progress=not args.quiet)
    init = init_model_dir(args.init_from, out, loaded.vocab)
    del loaded, codec
    used = manifest["documents"]
    report = {"manifest": str(Path(args.manifest).resolve()), "manifest_sha256": pairs.sha256, "init_from": init,
              "pairs": used, "rows": used + len(skipped), "audio_seconds": manifest["audio_seconds"],
              "tokens": manifest["tokens"]["total"], **summarize_skips(skipped),
              "longer_than_seq_len": _long_documents(lengths, seq_len, "pairs", report_file,
                                                     " (the target then trains without its source)")}
    atomic_write_json(report_file, report)
    line = (f"data: {used:,} pairs used, {len(skipped):,} skipped"
            + (f" ({', '.join(f'{n} {r}' for r, n in report['skipped_reasons'].items())})" if skipped else "")
            + f"; details in {report_file}")
    say(line)
    return {"data": [str(data)], "init_from": init, "train_tokens": epochs_to_tokens(manifest, epochs),
            "report": line}


def _long_documents(lengths: dict, seq_len: int, what: str, report_file: Path, why: str = "") -> dict:
    """The documents longer than `seq_len` (cut across training windows), with a warning naming the longest."""
    long = sorted(((n, i) for i, n in lengths.items() if n > seq_len), reverse=True)
    if long:
        named = ", ".join(f"{i} ({n:,} tokens)" for n, i in long[:LISTED_LONG])
        say(f"warning: {len(long):,} of {len(lengths):,} {what} are longer than --seq-len {seq_len} and are cut "
            f"across training windows{why}: {named}" + (", ..." if len(long) > LISTED_LONG else "") + f"; all in "
            f"{report_file}")
    return {"seq_len": seq_len, "count": len(long), "documents": [{"id": i, "tokens": n} for n, i in long]}


def prepare_instruct(args, cfg, out: Path) -> dict:
    """RUN/data (one shard directory per source) and RUN/data_report.json, by rank 0 (kept on --resume; a --data
    file edited since is refused); what training needs from them."""
    from soda.finetune.instruct_data import (
        contamination_message,
        mixture,
        parse_caps,
        prepare_instruct_data,
        read_report,
        refuse_edited_data,
        save_report,
    )

    report_file = out / REPORT
    if args.resume or not is_rank_zero():
        if not is_rank_zero():
            wait_for(report_file)
        if not report_file.is_file():
            raise SodaError(f"--resume: {out / DATA_DIR} holds no prepared data; start the run again without --resume")
        report = read_report(report_file)
        if not report.get("init_from"):
            raise SodaError(f"{report_file}: rank 0 refused this data ({contamination_message(report)}); see the "
                            f"report")
        refuse_edited_data(report, out / DATA_DIR)
        return {"data": report["train_data"], "init_from": report["init_from"], "mix": report["mix"],
                "train_tokens": report["train_tokens"], "report": None}
    if not 0 <= args.validation_fraction < 1 or args.items_per_shard < 1:
        raise SodaError("--validation-fraction must be in [0, 1) and --items-per-shard positive")
    from soda.checkpoints import load_model

    loaded = load_model(args.init_from, device=args.device, codec=args.codec, weights=False)
    codec = loaded.load_codec()
    say(f"encoding the clips of {', '.join(args.instruct_data)} with {loaded.codec_label} into {out / DATA_DIR}")
    report = prepare_instruct_data(args.instruct_data, out / DATA_DIR, loaded.vocab, codec, caps=parse_caps(args.cap),
                                   seed=cfg.seed, validation_fraction=args.validation_fraction,
                                   items_per_shard=args.items_per_shard, eval_sets=args.eval_sets,
                                   contamination=args.contamination, progress=not args.quiet)
    lengths = report.pop("_lengths")
    report["mix"] = mixture(report, cfg.mix, args.temperature)
    unknown = sorted(set(report["mix"]) - set(report["sources"]))
    if unknown:
        raise SodaError(f"--mix names {', '.join(unknown)}, but the sources are {', '.join(report['sources'])}")
    for name, source in report["sources"].items():
        source["weight"] = report["mix"].get(name, 0.0)
    report["train_data"] = [f"{name}={s['directory']}" for name, s in report["sources"].items()]
    report["train_tokens"] = max(1, round((cfg.epochs or INSTRUCT_DEFAULTS["epochs"])
                                          * sum(s["train_tokens"] for s in report["sources"].values())))
    report["longer_than_seq_len"] = _long_documents(lengths, cfg.seq_len, "items", report_file)
    problem = contamination_message(report)
    if problem and args.contamination == "refuse":
        report["init_from"] = None
        save_report(report_file, report)
        raise SodaError(f"{problem}; details in {report_file}. Use --contamination drop to leave them out, or warn "
                        f"to train on them anyway")
    if problem:
        say(f"warning: {problem}" + (" (dropped)" if args.contamination == "drop" else ""))
    report["init_from"] = init_model_dir(args.init_from, out, loaded.vocab)
    del loaded, codec
    save_report(report_file, report)
    total = report["total"]
    for name, s in report["sources"].items():
        say(f"  {name}: {s['items']:,} items, {s['hours']:.2f} h ({s['unique_clips']:,} clips, {s['unique_hours']:.2f} "
            f"h unique), weight {s['weight']:.3f}")
    line = (f"data: {total['items']:,} items from {len(report['sources'])} sources, {total['hours']:.2f} h "
            f"({total['unique_hours']:.2f} h unique), {report['skipped_count']:,} rows skipped"
            + (f" ({', '.join(f'{n} {r}' for r, n in report['skipped_reasons'].items())})"
               if report["skipped_count"] else "") + f"; details in {report_file}")
    say(line)
    return {"data": report["train_data"], "init_from": report["init_from"], "mix": report["mix"],
            "train_tokens": report["train_tokens"], "report": line}


def prepare_docs(args, cfg, out: Path, tokens_given: bool) -> dict:
    """Check the shards against the checkpoint (vocabulary, codec); the --init-from soda-train can load."""
    from soda.checkpoints import load_model
    from soda.train.sources import resolve_sources

    if args.resume:
        return {"report": None}
    sources, vocab = resolve_sources(cfg.data, cfg.val_data, cfg.mix, cfg.vocab)
    loaded = load_model(args.init_from, device="cpu", weights=False)  # training loads the weights
    if not vocab.matches(loaded.vocab):
        raise SodaError(f"--data {cfg.data[0]}: its vocabulary ({vocab.size:,} ids, {vocab.n_codebooks} codebooks "
                        f"of {vocab.codebook_size}, text {vocab.text_tokenizer_source or '?'}) differs from "
                        f"{args.init_from}'s ({loaded.vocab.size:,} ids, {loaded.vocab.n_codebooks} codebooks of "
                        f"{loaded.vocab.codebook_size}); tokenize with the checkpoint's codec and text tokenizer")
    for s in sources:
        spec = (s.codec or {}).get("spec")
        if spec and loaded.codec_spec and spec != loaded.codec_spec:
            raise SodaError(f"--data {s.name}: tokenized with codec {spec}, but {args.init_from} was trained with "
                            f"{loaded.codec_spec}; re-tokenize with --codec {loaded.codec_spec}")
    init = init_model_dir(args.init_from, out, loaded.vocab)
    del loaded
    tokens = sum(s.train_tokens or 0 for s in sources)
    if not tokens and not tokens_given:
        raise SodaError("--data gives shard patterns without token counts: give --tokens")
    return {"data": list(cfg.data), "init_from": init, "train_tokens": max(1, round(tokens * cfg.epochs)),
            "report": None}


def evaluate_s2st(args) -> int:
    """soda-eval's s2st task under a fine-tuning name."""
    from soda.evaluate.cli import evaluate_checkpoint
    from soda.evaluate.tasks import EvalSettings

    given = {"device": args.device, "codec": args.codec, "limit": args.limit, "seed": args.seed,
             "s2st_source_language": args.source_language}
    settings = EvalSettings(s2st_asr=args.asr, s2st_speaker=args.speaker, s2st_source_text=args.source_text,
                            s2st_max_seconds=args.max_seconds, progress=not args.quiet and sys.stderr.isatty(),
                            **{k: v for k, v in given.items() if v is not None})
    return evaluate_checkpoint(args.checkpoint, ["s2st"], {"s2st": args.data}, settings, Path(args.out),
                               overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
