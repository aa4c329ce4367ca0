"""The two model families side by side on the synthetic audio-QA set: a PIPELINE DEMONSTRATION on CPU.

    python benchmarks/model_families.py --out /tmp/families [--items 12] [--test-items 6] [--epochs 40] [--speech]

Both start from random weights (no downloads): the native model is a tiny Qwen3 over a byte tokenizer and 8
`mimi:random` codebooks, fine-tuned whole by `soda-finetune instruct`; the encoder-projector model is a tiny
random Whisper encoder (frozen) + projector + a tiny random LLM whose LoRA rank (on every linear layer) is chosen
so its trainable parameters match the native model's. Both train for the same number of optimizer steps on the
same `train.json` (the native run's step count sets the other's epochs) and are scored by `soda-eval --tasks mcq`
(likelihood, each family's instruction format) on the held-out `test.json`, with the silence control.

The figures say that both pipelines run end to end on the same data and evaluator, and how fast each trains here;
with random codecs, random encoders and two-minute runs they say nothing about which design is better.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def audio_qa(out: Path, items: int, test_items: int, speech: bool) -> Path:
    spec = importlib.util.spec_from_file_location("make_audio_qa", REPO / "demo" / "make_audio_qa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_set(out, items=items, test_items=test_items, seed=0, speech=speech)


def native_base(out: Path) -> Path:
    """A random-init tiny native model directory (weights, vocab.json, the codec it reads) for --init-from."""
    from soda.checkpoints import SODA_META
    from soda.model import build_model
    from soda.shape import ModelShape
    from tokenize_audio.codecs import load_codec
    from tokenize_audio.vocab import Vocabulary, byte_tokenizer

    codec = load_codec("mimi:random", 8, "cpu")
    vocab = Vocabulary.build(byte_tokenizer(), 8, codec.codebook_size)
    shape = ModelShape(width=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=256, vocab=vocab.size, seq_len=512)
    model = build_model(shape, vocab, seed=0)
    model.save_pretrained(out)
    vocab.save(out)
    (out / SODA_META).write_text(json.dumps({"codec": {"spec": "mimi:random",
                                                       "label": "mimi:random: RANDOM weights, an offline test codec"}}))
    return out


def matching_rank(whisper: Path, llm: Path, target: int) -> tuple[int, int]:
    """(LoRA rank on every linear layer, its trainable count) closest to `target` trainable parameters."""
    from soda.audio_llm import EncoderProjectorConfig, EncoderProjectorModel

    def trainable(rank: int) -> int:
        config = EncoderProjectorConfig(encoder=str(whisper), llm=str(llm), lora_r=rank, lora_targets=ALL_LINEAR)
        return EncoderProjectorModel(config).parameter_counts()["trainable"]

    one, two = trainable(1), trainable(2)
    rank = max(1, round(1 + (target - one) / (two - one)))
    return rank, trainable(rank)


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def mean_of(rows: list[dict], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return sum(values[1:]) / len(values[1:]) if len(values) > 1 else None  # the first step includes start-up


def evaluate(checkpoint: Path, test: Path, out: Path, native: bool) -> dict:
    from soda.evaluate.cli import main as eval_main

    extra = ["--mcq-format", "instruct"] if native else []
    assert eval_main([str(checkpoint), "--tasks", "mcq", "--data-for", f"mcq={test}", "--out", str(out),
                      "--overwrite", *extra]) == 0
    mcq = json.loads((out / "results.json").read_text())["tasks"]["mcq"]
    return {"accuracy": mcq["value"], "chance": mcq["chance"],
            "accuracy_silence": mcq["audio_contribution"]["accuracy_silence"],
            "by_domain": {k: round(v["accuracy"], 3) for k, v in mcq["by_domain"].items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--items", type=int, default=12, help="training questions per kind (default 12)")
    p.add_argument("--test-items", type=int, default=6, help="held-out questions per kind (default 6)")
    p.add_argument("--epochs", type=float, default=40, help="passes of the native run (default 40)")
    p.add_argument("--speech", action="store_true", help="also spoken digits (needs espeak-ng)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--llm-width", type=int, default=384, help="the random LLM's width (default 384, 4 layers)")
    p.add_argument("--family-lr", type=float, default=3e-3,
                   help="the encoder-projector run's LR (default 3e-3; the native run's is 1e-2, as the tests')")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from soda.finetune.cli import main as finetune

    out = args.out
    for run in ("native", "encoder-projector", "native-base", "parts", "qa"):  # a fresh comparison each time
        shutil.rmtree(out / run, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    qa = audio_qa(out / "qa", args.items, args.test_items, args.speech)
    base = native_base(out / "native-base")
    native_run = out / "native"
    started = time.perf_counter()
    assert finetune(["instruct", "--init-from", str(base), "--data", f"mcq={qa / 'train.json'}", "--out",
                     str(native_run), "--seq-len", "512", "--batch-tokens", "2048", "--lr", "1e-2", "--warmup", "0.1",
                     "--epochs", str(args.epochs), "--validation-fraction", "0", "--workers", "0", "--log-every", "1",
                     "--ckpt-every", "100000", "--quiet"]) == 0
    native_seconds = time.perf_counter() - started
    native_rows = metrics(native_run)
    steps = int(native_rows[-1]["step"]) + 1
    native_params = sum(t.numel() for t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(native_run / "hf" / "model.safetensors")).values())

    from soda.audio_llm import random_parts

    # an LLM wide enough that the matching LoRA rank stays below its width (the native model's 2.2M parameters are
    # mostly its 16.6k-id embedding tables)
    whisper, llm = random_parts(out / "parts", whisper_width=64, whisper_layers=2, llm_width=args.llm_width,
                                llm_layers=4)
    rank, trainable = matching_rank(whisper, llm, native_params)
    train_items = len(json.loads((qa / "train.json").read_text()))
    batch = 12
    family_run = out / "encoder-projector"
    started = time.perf_counter()
    assert finetune(["instruct", "--architecture", "encoder-projector", "--encoder", str(whisper), "--llm", str(llm),
                     "--data", f"mcq={qa / 'train.json'}", "--out", str(family_run), "--batch-size", str(batch),
                     "--epochs", str(steps * batch / train_items), "--lr", str(args.family_lr), "--warmup", "0.1",
                     "--lora-r", str(rank), "--lora-alpha", str(2 * rank), "--lora-targets", ",".join(ALL_LINEAR),
                     "--lora-dropout", "0", "--validation-fraction", "0", "--workers", "0", "--log-every", "1",
                     "--ckpt-every", "100000", "--quiet"]) == 0
    family_seconds = time.perf_counter() - started
    family_rows = metrics(family_run)

    test = qa / "test.json"
    summary = {
        "label": "pipeline demonstration on CPU: random codec, random encoder, random LLMs, tiny models",
        "steps": steps, "train_questions": train_items, "test_questions": len(json.loads(test.read_text())),
        "native": {"trainable_parameters": native_params, "total_parameters": native_params,
                   "tokens_per_s": mean_of(native_rows, "tokens_per_s"), "train_seconds": round(native_seconds, 1),
                   "final_loss": float(next(r["train/loss"] for r in reversed(native_rows) if r.get("train/loss"))),
                   **evaluate(native_run, test, out / "eval-native", native=True)},
        "encoder-projector": {"trainable_parameters": trainable, "lora_rank": rank,
                              "total_parameters": None, "tokens_per_s": mean_of(family_rows, "tokens_per_s"),
                              "train_seconds": round(family_seconds, 1),
                              "final_loss": float(next(r["train/loss"] for r in reversed(family_rows)
                                                       if r.get("train/loss"))),
                              **evaluate(family_run, test, out / "eval-encoder-projector", native=False)},
    }
    results = json.loads((out / "eval-encoder-projector" / "results.json").read_text())
    summary["encoder-projector"]["total_parameters"] = results["model"].get("parameters")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nPIPELINE DEMONSTRATION on CPU ({summary['label']}); {steps} steps each, {train_items} training and "
          f"{summary['test_questions']} held-out questions")
    print(f"{'family':<20}{'trainable':>11}{'total':>11}{'tokens/s':>10}{'train s':>9}{'loss':>7}{'acc':>7}"
          f"{'silence':>9}{'chance':>8}  by kind")
    for name in ("native", "encoder-projector"):
        r = summary[name]
        print(f"{name:<20}{r['trainable_parameters']:>11,}{r['total_parameters'] or 0:>11,}"
              f"{r['tokens_per_s'] or 0:>10,.0f}{r['train_seconds']:>9.1f}{r['final_loss']:>7.3f}{r['accuracy']:>7.3f}"
              f"{r['accuracy_silence']:>9.3f}{r['chance']:>8.3f}  {r['by_domain']}")
    print(f"wrote {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
