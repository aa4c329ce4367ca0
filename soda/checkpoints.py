"""Checkpoints: where a run keeps them, safe loading, and export to a Hugging Face model directory."""

from __future__ import annotations

import contextlib
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
    return next(iter(_candidates(out)), None)


def _candidates(out: Path) -> list[Path]:
    """Step files, newest first; the `last.ckpt` link only when there are none."""
    steps = sorted(((n, p) for p in checkpoint_dir(out).glob("step*.ckpt") if (n := _step(p)) is not None),
                   reverse=True)
    if steps:
        return [p for _, p in steps]
    path = checkpoint_dir(out) / LAST
    return [path] if path.exists() else []


def kept_message(out: Path, prog: str = "soda-train") -> str:
    """What a stopped run leaves, said truthfully: its newest checkpoint and the command that continues it, or that
    there is none (a stop during start-up, before the first save)."""
    import shlex

    ckpt = last_checkpoint(out)
    if ckpt is None:
        return "no checkpoint was saved yet: nothing to resume; run the same command again to start over"
    return (f"checkpoint {ckpt.resolve() if ckpt.is_symlink() else ckpt} is kept; continue with: "
            f"{prog} --out {shlex.quote(str(out))} --resume")


def first_nonfinite(tree, name: str = "") -> str | None:
    """The name of the first tensor in a (nested) checkpoint or state dict that holds a NaN or Inf, else None. Saving
    and exporting refuse such state: a run that diverged must never leave a "last good" file that is not."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            data = tree.to_local() if hasattr(tree, "to_local") else tree  # a DTensor: this rank's shard
            if not bool(torch.isfinite(data).all()):
                return name or "tensor"
        return None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        if (found := first_nonfinite(value, f"{name}.{key}" if name else str(key))) is not None:
            return found
    return None


def unreadable_reason(path: Path) -> str | None:
    """Why `path` cannot be resumed from (truncated, not a checkpoint), or None. Cheap: the archive's index and
    pickle are read, the tensor data only mapped."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        return "it is gone"
    except Exception as e:  # a truncated or foreign file: torch says why in its first line
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}" if str(e).strip() else type(e).__name__
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return "not a soda-train checkpoint (no state_dict or global_step)"
    return None


def resumable_checkpoint(out: Path, move_aside: bool, say=print) -> Path | None:
    """The newest checkpoint of the run that loads, for --resume. A newer one that does not (cut short outside our
    atomic writes: a copy, a sync, a disk fault) is named in one line and, by `move_aside` (rank zero only: the
    other ranks skip it untouched), renamed to `NAME.corrupt` beside it: kept for inspection, never deleted, and
    skipped by every later requeue."""
    for path in _candidates(out):
        reason = unreadable_reason(path)
        if reason is None:
            return path
        if move_aside:
            real = path.resolve()
            aside, n = real.with_name(real.name + ".corrupt"), 1
            while aside.exists():
                n += 1
                aside = real.with_name(f"{real.name}.corrupt{n}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(real, aside)
            if path.is_symlink():
                path.unlink()
            say(f"checkpoint {path} cannot be read ({reason}); moved aside to {aside.name}; resuming from the "
                f"newest readable one before it")
    return None


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


def check_weight_files(directory: Path) -> None:
    """Refuse a model directory whose safetensors file is truncated or damaged, naming the file (safetensors
    itself raises a bare SafetensorError that names none). Reads only each file's header: cheap at any size."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise SodaError(f"{file}: not a loadable weights file ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:200]}); truncated or damaged? export or copy it "
                            f"again") from None


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
    if (bad := first_nonfinite(state)) is not None:
        raise SodaError(f"{checkpoint}: not exported: {bad} holds a NaN or Inf")
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
