"""Flat vs hierarchical at matched training FLOPs on the bundled demo corpus: a PIPELINE DEMONSTRATION on CPU.

    python benchmarks/family_comparison.py                           # tiny models, a few CPU minutes
    python benchmarks/family_comparison.py --write                   # ... and its section in benchmarks/RESULTS.md
    python benchmarks/family_comparison.py --flat-steps 400 --tts-prompts 32 --size 135m   # bigger (hours on CPU)

Both families are trained by `soda-train` itself (`--config configs/demo.yaml`, the README's demo settings, with
`--architecture flat|hierarchical`) on the demo corpus's shards: `runs/demo/tokens` when plain `soda-train` has made
them, else the demo's own `prepare_demo_data` tokenizes the bundled corpus into OUT/tokens. The hierarchical
backbone has the flat model's shape (`--size`).

Matched FLOPs. A run's training FLOPs are what soda-train counts (MFU, `--dry-run`):
`soda.train.plan.flops_per_token_of(cfg, shape) * cfg.batch_sequences * cfg.seq_len * steps`, with cfg and shape
resolved from the very flags the run is given. The budget is the flat run's at `--flat-steps` (or `--budget`), and
each family gets the step count whose total comes nearest it. The hierarchical run's window and batch are their own
flags (`--hier-seq-len`, default the flat `--seq-len` // 8; `--hier-batch-tokens`, default `--batch-tokens` // 8),
passed to soda-train as `--seq-len` / `--batch-tokens`, which for this family count steps (a text token or a whole
audio frame): by default a hierarchical window holds the audio of a flat one, and a batch as many windows.

Figures, each family through the product's own paths:
- NLL vector: `soda-eval RUN/hf --tasks nll` on the demo's held-out shards, every held-out document scored in windows
  of the flat `--seq-len` flat ids (the same documents and windows for both families: comparable by construction),
  and the last `val/nll_*` of RUN/metrics.csv (each run's own validation windows).
- TTS termination rate: `soda-eval --tasks tts` on `--tts-prompts` seeded transcripts of the demo corpus (SODA's
  sampling, seed `--seed`; the share that ends with <|audio_end|> before the cap of 2 s + 0.2 s per character;
  pocketsphinx as the offline ASR, so its WER is printed but means nothing with a random codec).
- Decode speed: benchmarks/generate_throughput.py's continuation timing (greedy, silence stop off, KV cache) on
  the trained exports: audio-seconds per wall-second, and analytic forward FLOPs per audio-second
  (`soda.generate.hierarchical.decoding_flops_per_audio_second`).

Tiny models, a random codec (`mimi:random`), a few minutes of shared CPU: the figures show that both families train,
export, evaluate and decode through the same pipeline at one budget. They are not a research result.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

FAMILIES = ("flat", "hierarchical")
LABEL = "pipeline demonstration"
SECTION = "## Flat vs hierarchical at matched training FLOPs on the demo corpus — a PIPELINE DEMONSTRATION on CPU"
EVAL = "import sys; from soda.evaluate.cli import main; sys.exit(main(sys.argv[1:]))"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "family-comparison",
                   help="working directory (runs, evaluations; replaced run by run); default runs/family-comparison")
    p.add_argument("--tokens", type=Path,
                   help="soda-tokenize output to train on (default: runs/demo/tokens if plain soda-train made it, "
                        "else the demo corpus tokenized into OUT/tokens)")
    p.add_argument("--size", default="tiny", help="model shape of the flat model and the hierarchical backbone")
    p.add_argument("--seq-len", type=int, default=256, help="flat window (default 256, the demo's)")
    p.add_argument("--batch-tokens", type=int, default=2048, help="flat batch (default 2048: 8 windows, the demo's)")
    p.add_argument("--hier-seq-len", type=int, help="hierarchical --seq-len (default: --seq-len // 8)")
    p.add_argument("--hier-batch-tokens", type=int, help="hierarchical --batch-tokens (default: --batch-tokens // 8)")
    p.add_argument("--flat-steps", type=int, default=40, help="the budget: the flat run's FLOPs at this many steps")
    p.add_argument("--budget", type=float, help="training FLOPs of each run (overrides --flat-steps)")
    p.add_argument("--val-batches", type=int, default=4, help="validation batches at the end of each run")
    p.add_argument("--tts-prompts", type=int, default=6, help="TTS prompts per family (default 6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the TTS prompts' choice and sampling")
    p.add_argument("--decode-seconds", type=float, default=3.0, help="audio per continuation when timing decode")
    p.add_argument("--decode-batch", type=int, default=4, help="continuations decoded together")
    p.add_argument("--prompt-seconds", type=float, default=2.0, help="random audio prompt of each continuation")
    p.add_argument("--repeat", type=int, default=1, help="timed decode runs (best is reported)")
    p.add_argument("--write", action="store_true", help="append/replace this section of benchmarks/RESULTS.md")
    return p.parse_args()


# --------------------------------------------------------------------------------------------
# Training at one budget
# --------------------------------------------------------------------------------------------
def demo_tokens(args) -> Path:
    """The demo's shards: --tokens, the README demo's runs/demo/tokens, or the demo corpus tokenized as it does."""
    from soda.train.cli import prepare_demo_data

    if args.tokens:
        return args.tokens
    if (REPO / "runs" / "demo" / "tokens" / "manifest.json").is_file():
        return REPO / "runs" / "demo" / "tokens"
    prepare_demo_data(args.out)  # what plain soda-train does into runs/demo: OUT/tokens, once
    return args.out / "tokens"


def train_argv(family: str, args, tokens: Path, seq_len: int, batch_tokens: int) -> list[str]:
    """soda-train's flags for `family`, less --tokens and the cadences (which follow the step count)."""
    return ["--config", str(REPO / "configs" / "demo.yaml"), "--data", f"speech={tokens}", "--data", f"text={tokens}",
            "--architecture", family, "--size", args.size, "--seq-len", str(seq_len),
            "--batch-tokens", str(batch_tokens), "--sample-every", "0", "--workers", "0",
            "--val-batches", str(args.val_batches), "--out", str(args.out / family)]


def resolved(argv: list[str]):
    """(TrainConfig, shape) exactly as soda-train resolves these flags (defaults < --config < flags)."""
    from soda.train.cli import build_parser, flag_values, resolve_config
    from soda.train.run import model_for_run
    from soda.train.sources import resolve_sources

    args = build_parser().parse_args(argv)
    cfg = resolve_config(flag_values(args), Path(args.out), False, args.config, [])
    vocab = resolve_sources(cfg.data, cfg.val_data, cfg.mix, cfg.vocab)[1]
    return cfg, model_for_run(cfg, vocab)[1]


def flops_per_step(cfg, shape) -> float:
    """Training FLOPs of one optimizer step, as soda-train counts them."""
    from soda.train.plan import flops_per_token_of

    return flops_per_token_of(cfg, shape) * cfg.batch_sequences * cfg.seq_len


def plan_runs(args, tokens: Path) -> dict:
    """Each family's flags, step count and training FLOPs at one budget."""
    windows = {"flat": (args.seq_len, args.batch_tokens),
               "hierarchical": (args.hier_seq_len or max(2, args.seq_len // 8),
                                args.hier_batch_tokens or max(1, args.batch_tokens // 8))}
    plans = {}
    for family in FAMILIES:
        argv = train_argv(family, args, tokens, *windows[family])
        cfg, shape = resolved(argv + ["--tokens", str(args.batch_tokens)])
        plans[family] = {"argv": argv, "cfg": cfg, "shape": shape, "per_step": flops_per_step(cfg, shape)}
    budget = args.budget or plans["flat"]["per_step"] * args.flat_steps
    for family, plan in plans.items():
        cfg = plan["cfg"]
        steps = max(1, round(budget / plan["per_step"]))
        tokens_arg = steps * cfg.batch_sequences * cfg.seq_len
        plan["argv"] += ["--tokens", str(tokens_arg), "--val-every", str(steps), "--ckpt-every", str(steps),
                         "--log-every", str(max(1, steps // 20))]
        cfg, shape = resolved(plan["argv"])  # the run's own config: its steps and FLOPs, not ours
        assert cfg.steps == steps, (family, cfg.steps, steps)
        plan.update(cfg=cfg, shape=shape, steps=steps, flops=flops_per_step(cfg, shape) * cfg.steps)
    return {"budget": budget, "plans": plans}


def train(family: str, plan: dict, out: Path) -> float:
    run = out / family
    shutil.rmtree(run, ignore_errors=True)
    print(f"\n$ soda-train {shlex.join(plan['argv'])}", flush=True)
    started = time.perf_counter()
    with open(out / f"train-{family}.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "soda.train", *plan["argv"]], stdout=log,
                              stderr=subprocess.STDOUT, env=child_env(), check=False)
    if done.returncode:
        sys.exit(f"family_comparison: soda-train ({family}) exited {done.returncode}; see {out}/train-{family}.log")
    return time.perf_counter() - started


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "HF_HUB_OFFLINE": "1"}


def last_validation(run: Path) -> dict[str, float]:
    """The last logged val/nll_* of RUN/metrics.csv, by group."""
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    if not rows:
        return {}
    return {k.removeprefix("val/nll_"): float(v) for k, v in rows[-1].items() if k.startswith("val/nll_") and v}


# --------------------------------------------------------------------------------------------
# soda-eval: NLL vector and TTS termination
# --------------------------------------------------------------------------------------------
def tts_prompts(path: Path, n: int, seed: int) -> Path:
    """`n` seeded transcripts of the demo corpus's utterances (as soda-tokenize reads them), one per line: soda-eval's
    .txt form."""
    import numpy as np

    from soda.train.config import DEMO_CORPUS
    from tokenize_audio.sources import read_inputs

    texts = sorted({u.text.strip() for u in read_inputs([str(DEMO_CORPUS / "speech")]).utterances} - {""})
    chosen = np.random.default_rng(seed).choice(len(texts), size=min(n, len(texts)), replace=False)
    path.write_text("".join(texts[i] + "\n" for i in sorted(chosen)))
    return path


def evaluate(family: str, args, tokens: Path, prompts: Path) -> dict:
    out = args.out / f"eval-{family}"
    argv = [str(args.out / family / "hf"), "--tasks", "nll,tts", "--data-for", f"nll={tokens}",
            "--data-for", f"tts={prompts}", "--max-len", str(args.seq_len), "--tts-asr", "pocketsphinx",
            "--tts-speaker", "none", "--seed", str(args.seed), "--device", "cpu", "--out", str(out), "--overwrite",
            "--quiet"]
    print(f"$ soda-eval {shlex.join(argv)}", flush=True)
    with open(args.out / f"eval-{family}.log", "w") as log:
        done = subprocess.run([sys.executable, "-c", EVAL, *argv], stdout=log, stderr=subprocess.STDOUT,
                              env=child_env(), check=False)
    if done.returncode:
        sys.exit(f"family_comparison: soda-eval ({family}) exited {done.returncode}; see {args.out}/eval-{family}.log")
    return json.loads((out / "results.json").read_text())["tasks"]


# --------------------------------------------------------------------------------------------
# Decode speed: generate_throughput's timing on the trained exports
# --------------------------------------------------------------------------------------------
def decode_speed(family: str, args, hshape) -> dict:
    import torch
    from generate_throughput import continuation_requests, decoder_for, model_steps, time_decoding

    from soda.checkpoints import load_model
    from soda.generate.hierarchical import decoding_flops_per_audio_second
    from soda.generate.prompts import GenerationSettings

    loaded = load_model(str(args.out / family / "hf"), device="cpu", hierarchical=True)
    vocab = loaded.vocab
    frames = int(args.prompt_seconds * 12.5)
    requests = continuation_requests(args.decode_batch, frames, vocab.n_codebooks, vocab.codebook_size)
    settings = GenerationSettings(temperature=0, max_seconds=args.decode_seconds, silence_seconds=0,
                                  batch_size=args.decode_batch)
    run = decoder_for(family, loaded.model, vocab, loaded.device, str(args.out / family / "hf"))
    with torch.no_grad():
        wall, outputs = time_decoding(run, requests, settings, args.repeat, loaded.device)
    audio = sum(r.seconds for r in outputs)
    context = frames + args.decode_seconds * 12.5 / 2  # the prompt and half the output, as generate_throughput
    return {"audio_seconds": audio, "wall_seconds": wall, "audio_per_wall": audio / wall,
            "steps_per_second": model_steps(family, outputs) / wall,
            "forward_flops_per_audio_second": decoding_flops_per_audio_second(hshape, context)[family],
            "parameters": sum(p.numel() for p in loaded.model.parameters())}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def wrap(text: str) -> str:
    return textwrap.fill(text, 115, break_on_hyphens=False)


def tables(summary: dict) -> str:
    fams, groups = summary["families"], summary["nll_groups"]
    lines = [wrap(f"Training FLOPs budget {summary['budget']:.4g} (3 x forward, soda-train's count); "
                  f"{summary['machine']}; load average {summary['load_average']:.1f} at start."), "",
             ("| family | window (--seq-len) | batch (--batch-tokens) | steps | training FLOPs | vs budget "
              "| parameters | train wall s |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, f in fams.items():
        lines.append(f"| {name} | {f['seq_len']} | {f['batch_tokens']} | {f['steps']} | {f['flops']:.4g} "
                     f"| {f['flops'] / summary['budget'] - 1:+.2%} | {f['parameters']:,} | {f['train_seconds']:.0f} |")
    lines += ["", wrap(f"NLL (nats/token) by group: soda-eval nll on the held-out shards in windows of "
                       f"{summary['nll_window']} flat ids, the same for both families (in brackets: the run's last "
                       f"val/nll_*, on its own training windows). unscored: audio ids outside whole frames, which "
                       f"the hierarchical family gives no probability (left out of its means)."), "",
              "| family | " + " | ".join(groups) + " | unscored |", "|---|" + "---:|" * (len(groups) + 1)]
    for name, f in fams.items():
        cells = [f"{f['nll'].get(g, float('nan')):.3f} ({f['val_nll'].get(g, float('nan')):.3f})" for g in groups]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {f['unscored_tokens']} |")
    lines += ["", wrap(f"Generation: TTS on {summary['tts_prompts']} seeded demo transcripts (soda-eval tts, "
                       f"SODA's sampling, seed {summary['seed']}); decode speed of {summary['decode']} (greedy, KV "
                       f"cache, silence stop off; FLOPs analytic, forward)."), "",
              ("| family | TTS termination (<\\|audio_end\\|>) | TTS endings | TTS mean s per output "
               "| decode audio s / wall s | model steps / s (flat: tokens) | forward GFLOP / audio s |"),
              "|---|---:|---|---:|---:|---:|---:|"]
    for name, f in fams.items():
        ended = ", ".join(f"{k} {v}" for k, v in sorted(f["tts_ended"].items()))
        lines.append(f"| {name} | {f['tts_termination']:.2f} | {ended} | {f['tts_mean_seconds']:.2f} "
                     f"| {f['decode']['audio_per_wall']:.2f} "
                     f"| {f['decode']['steps_per_second']:,.0f} "
                     f"| {f['decode']['forward_flops_per_audio_second'] / 1e9:.3g} |")
    return "\n".join(lines)


def write_results(text: str, command: str, summary: dict) -> None:
    path = REPO / "benchmarks" / "RESULTS.md"
    intro = (f"`benchmarks/family_comparison.py`: a {LABEL}, not a research result. Both families trained by "
             f"`soda-train` on the bundled demo corpus (codec `mimi:random`, RANDOM weights) from random weights at "
             f"one training-FLOPs budget, the hierarchical backbone of the flat model's shape (`--size "
             f"{summary['size']}`), then scored by `soda-eval` (nll, tts) and timed by "
             f"`benchmarks/generate_throughput.py`'s decode timing. Windows and batches are the values passed to "
             f"soda-train's `--seq-len` / `--batch-tokens`, in the unit it counts them in for each family. Machine: "
             f"{summary['machine']}, one run ({summary['total_seconds']:.0f} s in all, {summary['date']}).")
    body = f"{SECTION}\n\n{wrap(intro)}\n\n```bash\n{command}\n```\n\n{text}\n"
    old = path.read_text()
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + body
    else:  # up to the next heading of the same or a higher level
        following = re.search(r"^#{1,2} ", old[start + len(SECTION):], flags=re.MULTILINE)
        end = start + len(SECTION) + following.start() if following else len(old)
        new = old[:start] + body + ("\n" + old[end:] if following else "")
    path.write_text(new)
    print(f"wrote the section to {path}")


def main() -> int:
    args = parse()
    started = time.perf_counter()
    load = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    tokens = demo_tokens(args)
    runs = plan_runs(args, tokens)
    budget, plans = runs["budget"], runs["plans"]
    print(f"PIPELINE DEMONSTRATION: budget {budget:.4g} training FLOPs each; "
          + "; ".join(f"{f}: {p['steps']} steps of {p['cfg'].batch_sequences} x {p['cfg'].seq_len} "
                      f"({p['per_step']:.4g} FLOPs per step, {p['flops']:.4g} in all)" for f, p in plans.items()))
    prompts = tts_prompts(args.out / "tts_prompts.txt", args.tts_prompts, args.seed)
    hshape = plans["hierarchical"]["shape"]  # its backbone is the flat model's shape
    families = {}
    for family in FAMILIES:
        plan = plans[family]
        seconds = train(family, plan, args.out)
        tasks = evaluate(family, args, tokens, prompts)
        nll, tts = tasks["nll"], tasks["tts"]
        speed = decode_speed(family, args, hshape)
        families[family] = {
            "seq_len": plan["cfg"].seq_len, "batch_tokens": int(plan["cfg"].batch_tokens), "steps": plan["steps"],
            "flops": plan["flops"], "parameters": speed["parameters"], "train_seconds": seconds,
            "nll": nll["nll_by_group"], "unscored_tokens": nll["unscored_tokens"],
            "val_nll": last_validation(args.out / family), "tts_termination": tts["termination_rate"],
            "tts_ended": tts["ended"], "tts_mean_seconds": tts["audio_seconds"] / max(1, tts["count"]),
            "decode": speed}
    import torch

    from tokenize_audio.vocab import Vocabulary

    summary = {"label": LABEL, "budget": budget, "size": args.size, "nll_window": args.seq_len,
               "nll_groups": Vocabulary.load(tokens).nll_groups(), "tts_prompts": args.tts_prompts,
               "seed": args.seed, "families": families, "load_average": load,
               "decode": f"{args.decode_batch} continuations of {args.decode_seconds:g} s after a "
                         f"{args.prompt_seconds:g} s random audio prompt",
               "machine": f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
                          f"{torch.get_num_threads()} torch thread{'s' if torch.get_num_threads() > 1 else ''}, fp32",
               "date": time.strftime("%Y-%m-%d"), "total_seconds": time.perf_counter() - started}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    text = tables(summary)
    print(f"\nPIPELINE DEMONSTRATION ({summary['total_seconds']:.0f} s): tiny models, random codec, not a research "
          f"result\n\n{text}\n\nwrote {args.out / 'summary.json'}")
    if args.write:
        threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
        flags = shlex.join(a for a in sys.argv[1:] if a != "--write")
        write_results(text, f"{threads}python benchmarks/family_comparison.py {flags} --write".replace("  ", " "),
                      summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
