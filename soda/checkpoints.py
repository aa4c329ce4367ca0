"""Checkpoints: where a run keeps them, reading them safely, exporting them, and loading a model from any of them.

A CHECKPOINT argument (soda-generate, soda-eval, soda-finetune --init-from) may be a soda-train run directory
(its `hf/` export, or its last checkpoint), a `.ckpt` file, a Hugging Face model directory (a soda-train export,
or SODA's release layout), or a hub id such as `soda-research/soda-135m-base`. `load_model` returns the model, the
vocabulary that gives its ids a meaning, and the codec its audio ids came from (so audio is encoded and decoded
with the same one).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenize_audio.codecs import resolve_device
from tokenize_audio.errors import SodaError, first_line
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
        return first_line(e, 160, with_type=True)
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
        raise SodaError(f"{path}: not a loadable checkpoint ({first_line(e, 200, with_type=True)})") from None


def check_weight_files(directory: Path) -> None:
    """Refuse a model directory whose safetensors file is truncated or damaged, naming the file (safetensors
    itself raises a bare SafetensorError that names none). Reads only each file's header: cheap at any size."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise SodaError(f"{file}: not a loadable weights file ({first_line(e, 200, with_type=True)}); truncated "
                            f"or damaged? export or copy it again") from None


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


# --------------------------------------------------------------------------------------------
# Loading a model for generation and evaluation
# --------------------------------------------------------------------------------------------
# SODA's released models were tokenized with Mimi's first 8 codebooks of 2048 codes.
SODA_CODEC = "mimi"
SODA_CODEBOOKS, SODA_CODEBOOK_SIZE = 8, 2048


@dataclass
class LoadedModel:
    model: torch.nn.Module | None  # Qwen3ForCausalLM (or any causal LM), in eval mode on `device`; None: weights=False
    vocab: Vocabulary
    codec_spec: str | None  # e.g. "mimi", "mimi:random"; None when unknown (pass --codec)
    codec_label: str  # how to describe the codec in outputs (says RANDOM for offline codecs)
    source: str  # what was loaded, for reports
    device: torch.device

    def load_codec(self):
        """The codec that turns audio into this model's audio ids and back."""
        from tokenize_audio.codecs import load_codec

        if self.codec_spec is None:
            raise SodaError(f"{self.source}: the codec of this model is not recorded; pass --codec (e.g. mimi)")
        codec = load_codec(self.codec_spec, codebooks=self.vocab.n_codebooks, device=str(self.device))
        if codec.codebook_size != self.vocab.codebook_size:  # its codes would land on other codebooks' ids
            raise SodaError(f"codec {self.codec_spec} has codebooks of {codec.codebook_size} codes but {self.source} "
                            f"was trained on {self.vocab.codebook_size}; pass the codec it was trained with (--codec)")
        return codec


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, fp32 on CPU (no fast bf16 there)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(source: str, device: str = "auto", codec: str | None = None, dtype: torch.dtype | None = None,
               attention: str = "sdpa", weights: bool = True) -> LoadedModel:
    """Resolve CHECKPOINT (see module docstring); `codec` overrides the recorded codec. `weights=False` reads only
    the config, vocabulary and codec (`model` is None): what checking and encoding data against a model needs,
    without loading gigabytes of weights that training will load again."""
    dev = resolve_device(device)
    dtype = dtype or default_dtype(dev)
    path = resolve_checkpoint(source)
    if isinstance(path, str):
        model, config, vocab, meta = _from_hf(path, None, dtype, attention, weights)
    elif path.is_file():
        model, config, vocab, meta = _from_checkpoint(path, dtype, attention, weights)
    else:
        model, config, vocab, meta = _from_hf(str(path), path, dtype, attention, weights)
    if config.vocab_size < vocab.size:
        raise SodaError(f"{source}: the model has {config.vocab_size:,} ids but its vocabulary needs {vocab.size:,}")
    recorded = meta.get("codec") or {}
    spec = codec or recorded.get("spec") or meta.get("default_codec")
    label = recorded.get("label") if not codec and recorded.get("label") else (spec or "unknown")
    if spec and spec.endswith(("random", "random-full")) and "RANDOM" not in label:
        label = f"{spec}: RANDOM weights, an offline test codec"
    if model is not None:
        model.to(dev).eval()
    return LoadedModel(model, vocab, spec, label, str(source), dev)


def resolve_checkpoint(source: str) -> Path | str:
    """CHECKPOINT -> a `.ckpt` file or model directory (Path), or a hub id (str); a run directory gives its
    `hf/` export, else its last checkpoint."""
    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():  # a run directory
        if (path / "hf" / "config.json").is_file():
            return path / "hf"
        if (newest := last_checkpoint(path)) is not None:
            return newest
        raise SodaError(f"{source}: neither a model directory (config.json) nor a soda-train run directory "
                        f"(hf/ or checkpoints/{LAST})")
    if path.exists():
        return path
    if str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise SodaError(f"{source}: no such checkpoint, run directory or model directory")
    return str(source)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_SAMPLE = 1 << 20  # bytes read from each end of a weight file


def model_fingerprint(source: str) -> dict:
    """What a CHECKPOINT argument names, recognisably, for outputs that must not mix models (soda-eval's
    results.json, soda-generate's --out): the resolved path and a digest of each weight file's name, size and
    first and last MiB. Reading the ends keeps it fast at any size, and a re-trained or replaced checkpoint differs
    there (its first tensors and its end), while a copy elsewhere has the same digest. A hub id is its own digest;
    a source that names no file (a model built in memory) is its name."""
    import hashlib

    try:
        target = resolve_checkpoint(source)
    except SodaError:
        return {"path": str(source), "digest": f"name:{source}"}
    if isinstance(target, str):
        return {"path": target, "digest": f"hub:{target}"}
    files = [target] if target.is_file() else sorted(p for p in target.iterdir()
                                                     if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    digest, total = hashlib.sha256(), 0
    for f in files:
        size = f.stat().st_size
        total += size
        digest.update(f"{f.name}:{size}:".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(_SAMPLE))
            fh.seek(max(0, size - _SAMPLE))
            digest.update(fh.read(_SAMPLE))
    return {"path": str(target.resolve()), "bytes": total, "digest": digest.hexdigest()[:20]}


def _from_hf(name: str, path: Path | None, dtype, attention, weights: bool = True):
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if weights:
            if path is not None:
                check_weight_files(path)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=attention)
            config = model.config
        else:
            model, config = None, AutoConfig.from_pretrained(name)
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a damaged file in the hub cache
        raise SodaError(f"{name}: cannot load the model ({first_line(e, 200)})") from None
    meta: dict = {}
    if path is not None and (path / SODA_META).is_file():
        meta = json.loads((path / SODA_META).read_text())
    if path is not None and (path / "vocab.json").is_file():
        return model, config, Vocabulary.load(path), meta
    # SODA's release layout: one tokenizer.json holding text, the four specials and the audio tokens.
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path / "tokenizer.json")) if path is not None else Tokenizer.from_pretrained(name)
    except Exception as e:
        raise SodaError(f"{name}: no usable tokenizer.json ({first_line(e, 200)})") from None
    vocab = Vocabulary.build(tok, SODA_CODEBOOKS, SODA_CODEBOOK_SIZE, source=name)
    meta.setdefault("default_codec", SODA_CODEC)
    return model, config, vocab, meta


def _from_checkpoint(path: Path, dtype, attention, weights: bool = True):
    """A soda-train checkpoint: the model from its stored config; the vocabulary from the run's data."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    ckpt = load_checkpoint(path, mmap=not weights)  # mapped: the tensors are not read unless used
    if "soda" not in ckpt:
        raise SodaError(f"{path}: not a soda-train checkpoint (no model config inside)")
    config = Qwen3Config.from_dict(ckpt["soda"]["model_config"])
    config._attn_implementation = attention
    model = None
    if weights:
        model = Qwen3ForCausalLM(config)
        model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}, strict=True)
        model.to(dtype)
    run = path.resolve().parent.parent
    vocab = _run_vocabulary(run, ckpt["soda"]["vocab"], path)
    return model, config, vocab, {"codec": ckpt["soda"].get("codec")}


def _run_vocabulary(run: Path, expected: dict, ckpt: Path) -> Vocabulary:
    """The vocabulary (with its text tokenizer) from the directories the run was trained on."""
    import yaml

    candidates: list[Path] = []
    cfg_file = run / "config.yaml"
    if cfg_file.is_file():
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
        entries = list(cfg.get("data") or []) + ([cfg["vocab"]] if cfg.get("vocab") else [])
        for entry in entries:
            location = entry.get("path", "") if isinstance(entry, dict) else str(entry).split("=", 1)[-1]
            candidates.append(Path(location))
    for directory in candidates:
        if (directory / "vocab.json").is_file():
            vocab = Vocabulary.load(directory)
            if vocab.to_dict() | {"text_tokenizer": ""} == expected | {"text_tokenizer": ""}:
                return vocab
    raise SodaError(f"{ckpt}: cannot find the vocabulary it was trained with (looked in the run's data "
                    f"directories); export the run (soda-train writes RUN/hf) and load that instead")
