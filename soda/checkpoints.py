"""Checkpoints: where a run keeps them, safe loading, and export to a Hugging Face model directory."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from tokenize_audio.errors import SodaError
from tokenize_audio.shards import atomic_directory, atomic_write_text
from tokenize_audio.vocab import Vocabulary

LAST = "last.ckpt"
SODA_META = "soda.json"  # beside an HF export: the codec its audio ids came from


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def _step(path: Path) -> int | None:
    digits = path.stem.removeprefix("step")
    return int(digits) if path.stem.startswith("step") and digits.isdigit() else None


def last_checkpoint(out: Path) -> Path | None:
    """The run's newest checkpoint: the highest-numbered `stepN.ckpt` (each is written whole, then renamed), else
    `last.ckpt`. Not `last.ckpt` first: a kill between saving a step's file and re-pointing the link would
    otherwise resume from an older step, or find no checkpoint at all after the first save."""
    steps = [(n, p) for p in checkpoint_dir(out).glob("step*.ckpt") if (n := _step(p)) is not None]
    if steps:
        return max(steps)[1]
    path = checkpoint_dir(out) / LAST
    return path if path.exists() else None


def link_last(target: Path) -> None:
    """Point last.ckpt beside `target` at it, atomically (a symlink swapped in by rename)."""
    target = Path(target)
    tmp = target.parent / f".{LAST}.tmp{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(target.name, tmp)
    os.replace(tmp, target.parent / LAST)


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """Load with `weights_only=True`: tensors and plain data only, no arbitrary pickled code. `mmap`: tensors are
    mapped from the file, read only when touched (for reading a checkpoint's metadata)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise SodaError(f"{path}: checkpoint not found") from None
    except Exception as e:  # a truncated or foreign file
        raise SodaError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def export_hf(checkpoint: Path, out_dir: Path, vocab_dir: Path | None = None, vocab: Vocabulary | None = None) -> Path:
    """Write config, safetensors weights and tokenizer files that `AutoModelForCausalLM` loads.

    The vocabulary comes from `vocab`, or from a directory holding one (`vocab_dir`); without either, none is
    written."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    ckpt = load_checkpoint(checkpoint)
    if "soda" not in ckpt:
        raise SodaError(f"{checkpoint}: not a soda-train checkpoint (no model config inside)")
    config = Qwen3Config.from_dict(ckpt["soda"]["model_config"])
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state, assign=True, strict=True)
    with atomic_directory(Path(out_dir)) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if vocab is None and vocab_dir is not None:
            vocab = Vocabulary.load(Path(vocab_dir))
        if vocab is not None:
            vocab.save(tmp)  # vocab.json, text_tokenizer.json, tokenizer/
            for f in (tmp / "tokenizer").iterdir():  # tokenizer files beside the weights, as on the hub
                shutil.move(str(f), tmp / f.name)
            (tmp / "tokenizer").rmdir()
        atomic_write_text(tmp / SODA_META, json.dumps({"codec": ckpt["soda"].get("codec")}, indent=2))
        atomic_write_text(tmp / "README.md", f"Exported by soda-train from {Path(checkpoint).name} "
                                             f"(step {ckpt.get('global_step', '?')}).\n")
    return Path(out_dir)
