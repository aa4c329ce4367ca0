"""`soda-eval CHECKPOINT --tasks ... --out DIR`: benchmarks of one checkpoint, beside SODA's published table."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from soda.evaluate import report
from soda.evaluate.scoring import codebook_choice
from soda.evaluate.tasks import Context, EvalSettings, available
from soda.settings import add_arguments, check_bounds, from_args
from tokenize_audio.errors import SodaError, cli_errors


def build_parser(tasks: dict) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soda-eval", allow_abbrev=False,
        description="Evaluate a checkpoint (soda-train run directory, .ckpt, Hugging Face directory, SODA release "
                    "or hub id): likelihood benchmarks, the NLL vector, multiple-choice audio QA. Writes "
                    "OUT/results.json, OUT/results.md (beside SODA's published numbers for the same size), "
                    "per-item scores in OUT/items/ and OUT/report.html (a page to look and listen: open it in a "
                    "browser). Runs of one checkpoint into one OUT add up: each updates the "
                    "tasks it ran and keeps the others.",
        epilog="tasks and their --data-for inputs:\n"
               + "\n".join(f"  {name:<8} {t.data_help}" for name, t in tasks.items())
               + "\n\nexamples:\n"
                 "  soda-eval runs/600m --tasks swuggy,sblimp,salmon,twuggy,tblimp --out eval/600m\n"
                 "  soda-eval runs/600m --tasks nll --data-for nll=tokens/librispeech-dev --out eval/600m\n"
                 "  soda-eval soda-research/soda-135m-base --tasks mcq --data-for mcq=mmau-test-mini.json \\\n"
                 "            --split-weak-strong --judges runs/a,runs/b,runs/c --out eval/mmau\n"
                 "  soda-eval runs/instruct --tasks mcq --data-for mcq=mmau-test-mini.json --mcq-mode generate \\\n"
                 "            --out eval/mmau-generated",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="run directory, .ckpt file, Hugging Face model directory or hub id")
    p.add_argument("--tasks", default="", help=f"comma-separated: {','.join(tasks)}")
    p.add_argument("--data-for", action="append", default=[], metavar="TASK=PATH",
                   help="input of one task (repeatable); see the list below for defaults")
    p.add_argument("--out", required=True,
                   help="output directory; a later run of the same checkpoint into it updates the tasks it runs and "
                        "keeps the others")
    p.add_argument("--overwrite", action="store_true",
                   help="discard the results already in --out (refused without it when they are of another "
                        "checkpoint)")
    add_arguments(p, EvalSettings)  # --device ... --quiet
    p.add_argument("--compare", metavar="OTHER_EVAL_DIR",
                   help="draw another soda-eval --out's NLL vector beside this one's in OUT/report.html")
    p.add_argument("--lm-eval-task", action="append", default=[], metavar="NAME",
                   help="any lm-evaluation-harness task, scored on the model's text side, either family (repeatable "
                        "or comma-separated; pip install '.[lmeval]'); --tasks hellaswag is one")
    return p


def parse_data_for(values: list[str], chosen: list[str], tasks: dict) -> dict[str, str]:
    data = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not path:
            raise SodaError(f"--data-for {value}: expected TASK=PATH")
        if name not in tasks:
            raise SodaError(f"--data-for {value}: unknown task {name!r}; choose from {', '.join(tasks)}")
        if name not in chosen:
            raise SodaError(f"--data-for {value}: task {name} is not in --tasks")
        data[name] = path
    return data


def evaluate(loaded, names: list[str], data_for: dict, settings: EvalSettings, out: Path, codec=None,
             log=print, overwrite: bool = False, checkpoint: dict | None = None, compare: Path | None = None) -> dict:
    """Load every task's inputs first (mistakes surface before any scoring), then score them in turn.

    Each task is merged into OUT/results.json as it finishes (`report.merge`), so the finished ones survive an
    interruption and tasks of earlier runs of the same checkpoint are kept. `checkpoint` is the model's
    fingerprint (`model_fingerprint(loaded.source)` by default); an OUT holding another checkpoint's results is
    refused before any work, unless `overwrite` clears it.
    """
    from soda.checkpoints import model_fingerprint

    tasks = available()
    out = Path(out)
    checkpoint = checkpoint or model_fingerprint(loaded.source)
    ctx = Context(loaded, settings, out, codec)
    codebook_choice(settings.codebooks, loaded.vocab)  # a bad --codebooks fails before any work
    inputs = {name: tasks[name].load(ctx, data_for.get(name)) for name in names}
    if any(tasks[name].audio for name in names):
        ctx.codec  # noqa: B018 -- load it now: a codec that cannot be loaded fails before any scoring
    log(f"soda-eval: {loaded.source} on {loaded.device} (codec: {loaded.codec_label}); tasks: {', '.join(names)}")
    if settings.split_weak_strong and "mcq" in names:
        from soda.evaluate.mcq import weak_votes

        weak_votes(settings, len(settings.judges) or 1)
    header = {"model": report.model_summary(loaded), "checkpoint": checkpoint}
    report.claim(out, header, overwrite)  # after every check: a mistake there leaves --out as it was
    results: dict = {}
    for name in names:
        started = time.time()
        result = tasks[name].run(ctx, inputs[name])
        results[name] = report.record(out, header, name, result, settings, time.time() - started, tasks, compare,
                                      log)
    return results


@cli_errors("soda-eval")
def main(argv=None) -> int:
    tasks = available()
    args = build_parser(tasks).parse_args(argv)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.lm_eval_task:
        from soda.evaluate.lm_eval import lm_eval_task

        names += [lm_eval_task(t.strip()) for value in args.lm_eval_task for t in value.split(",") if t.strip()]
    unknown = [t for t in names if t not in tasks]
    if unknown or not names:
        problem = f"unknown task {unknown[0]!r}" if unknown else "no task given"
        raise SodaError(f"--tasks: {problem}; choose from {', '.join(tasks)}")
    names = list(dict.fromkeys(names))
    data_for = parse_data_for(args.data_for, names, tasks)
    settings = from_args(EvalSettings, args, progress=args.progress and sys.stderr.isatty())
    check_bounds(settings)
    if (settings.judges or settings.weak_votes is not None) and not settings.split_weak_strong:
        raise SodaError("--judges and --weak-votes only apply with --split-weak-strong")
    if settings.mcq_permutations > 1 and settings.mcq_mode != "likelihood":
        raise SodaError("--mcq-permutations applies to --mcq-mode likelihood")
    try:
        settings.mcq_template.format(question="", choices="")
    except (KeyError, IndexError, ValueError) as err:
        raise SodaError(f"--mcq-template: only {{question}} and {{choices}} can be filled in ({err})") from None
    compare = Path(args.compare) if args.compare else None
    if compare is not None and not (compare / report.RESULTS).is_file():
        raise SodaError(f"--compare {args.compare}: no {report.RESULTS} there (give another soda-eval --out)")
    return evaluate_checkpoint(args.checkpoint, names, data_for, settings, Path(args.out), args.overwrite, compare)


def evaluate_checkpoint(checkpoint: str, names: list[str], data_for: dict, settings: EvalSettings, out: Path,
                        overwrite: bool = False, compare: Path | None = None) -> int:
    """soda-eval after its flags are read: load CHECKPOINT (after refusing an OUT holding another checkpoint's
    results), run the tasks `names` into OUT, say what was written. soda-finetune eval-s2st calls it too. An
    encoder-projector model (`soda.audio_llm`) is evaluated by `soda.evaluate.audio_llm`."""
    from soda.checkpoints import encoder_projector_source, load_model, model_fingerprint

    check_bounds(settings)
    if not settings.progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if encoder_projector_source(checkpoint) is not None:
        from soda.evaluate.audio_llm import evaluate_encoder_projector

        evaluate_encoder_projector(checkpoint, names, data_for, settings, Path(out), overwrite, compare)
        print(f"soda-eval: wrote {Path(out) / 'results.json'}, results.md and report.html", file=sys.stderr)
        return 0
    fingerprint = model_fingerprint(checkpoint)
    if not overwrite:  # before loading the model: another checkpoint's results are not mixed in
        report.check_checkpoint(Path(out), fingerprint)
    loaded = load_model(checkpoint, device=settings.device, codec=settings.codec, hierarchical=True)  # either family
    evaluate(loaded, names, data_for, settings, Path(out), log=lambda m: print(m, file=sys.stderr),
             overwrite=overwrite, checkpoint=fingerprint, compare=compare)
    print(f"soda-eval: wrote {Path(out) / 'results.json'}, results.md and report.html", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
