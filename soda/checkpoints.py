"""Checkpoints: where a run keeps them, reading them safely, exporting them, and loading a model from any of them.

A checkpoint is `checkpoints/stepNNNNNNN.ckpt`, in one of two layouts: a single file (DDP, one device), or under
FSDP a sharded directory of the same name (`torch.distributed.checkpoint`: each rank's `__R_0.distcp`, the index
`.metadata`, and Lightning's `meta.pt` holding the loop and data state). Both are written whole under a temporary
name and renamed: a directory without its index and `meta.pt` was cut short outside our writes and is torn.

A CHECKPOINT argument (soda-generate, soda-eval, soda-finetune --init-from) may be a soda-train run directory
(its `hf/` export, or its last checkpoint), a `.ckpt` file or sharded `.ckpt` directory, a Hugging Face model
directory (a soda-train export,
or SODA's release layout), or a hub id such as `soda-research/soda-135m-base`. `load_model` returns the model, the
vocabulary that gives its ids a meaning, and the codec its audio ids came from (so audio is encoded and decoded
with the same one). A hierarchical run (`soda.hierarchical`) exports config.json with model_type soda_hierarchical
beside the same files; `load_model(..., hierarchical=True)` reads it (or the run's `.ckpt`), other callers refuse it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenize_audio.codecs import resolve_device
from tokenize_audio.errors import SodaError, first_line
from tokenize_audio.shards import atomic_directory, atomic_write_text
from tokenize_audio.vocab import Vocabulary

LAST = "last.ckpt"
SODA_META = "soda.json"  # beside an HF export: the codec its audio ids came from
DCP_INDEX = ".metadata"  # torch.distributed.checkpoint's index of every rank's shards
LIGHTNING_META = "meta.pt"  # Lightning's non-tensor state of a sharded checkpoint (its _METADATA_FILENAME)
EXPORT_SHARD_BYTES = 2 << 30  # an export from a sharded checkpoint holds at most this much in memory at once


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def is_sharded(path: Path) -> bool:
    """Whether `path` (a step or `last.ckpt`, links followed) is a sharded checkpoint directory."""
    return Path(path).is_dir()


def step_of(path: Path) -> int | None:
    """The step a `stepN.ckpt` (file or directory) holds, from its name; None for other names."""
    stem = Path(path).stem
    digits = stem.removeprefix("step")
    return int(digits) if stem.startswith("step") and digits.isdigit() else None


def step_checkpoints(out: Path) -> dict[int, Path]:
    """Every saved step of a run, by step (files and sharded directories alike)."""
    return dict(sorted((n, p) for p in checkpoint_dir(out).glob("step*.ckpt") if (n := step_of(p)) is not None))


def last_checkpoint(out: Path) -> Path | None:
    """The run's newest checkpoint: the highest-numbered `stepN.ckpt` (each is written whole, then renamed), else
    `last.ckpt`. Not `last.ckpt` first: a kill between saving a step's file and re-pointing the link would
    otherwise resume from an older step, or find no checkpoint at all after the first save."""
    return next(iter(_candidates(out)), None)


def _candidates(out: Path) -> list[Path]:
    """Step checkpoints (files or sharded directories), newest first; the `last.ckpt` link only when there are none."""
    steps = step_checkpoints(out)
    if steps:
        return [steps[n] for n in sorted(steps, reverse=True)]
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
    """Why `path` cannot be resumed from (truncated, torn, not a checkpoint), or None. Cheap: the archive's index and
    pickle are read, the tensor data only mapped; of a sharded directory, its index and `meta.pt`, and whether every
    shard file the index names is there."""
    if is_sharded(path):
        return _torn_reason(Path(path))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        return "it is gone"
    except Exception as e:  # a truncated or foreign file: torch says why in its first line
        return first_line(e, 160, with_type=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return "not a soda-train checkpoint (no state_dict or global_step)"
    return None


def _torn_reason(path: Path) -> str | None:
    if not (path / DCP_INDEX).is_file():
        return f"torn: no {DCP_INDEX} (the shards' index, written after every rank's shards)"
    if not (path / LIGHTNING_META).is_file():
        return f"torn: no {LIGHTNING_META} (the loop and data state, written last)"
    try:
        meta = torch.load(path / LIGHTNING_META, map_location="cpu", weights_only=True)
        index = _read_index(path)
    except Exception as e:
        return first_line(e, 160, with_type=True)
    if not isinstance(meta, dict) or "global_step" not in meta:
        return f"not a soda-train checkpoint (no global_step in {LIGHTNING_META})"
    files = {item.relative_path for item in (index.storage_data or {}).values() if hasattr(item, "relative_path")}
    missing = sorted(f for f in files if not (path / f).is_file())
    if missing:
        return f"torn: shard file {missing[0]} is missing ({len(missing)} of {len(files)})"
    return None


def _read_index(path: Path):
    """The DCP index (tensor names, shapes, dtypes, where each shard lies) of a sharded checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path)).read_metadata()


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


def remove_partial_writes(out: Path, say=print) -> None:
    """Remove what saves cut short by a kill left in the run's checkpoint directory (a sharded `.stepN.ckpt.tmp/`,
    a single file's `.stepN.ckpt.*.tmp`): never a checkpoint (those are renamed into place whole), but up to a whole
    checkpoint's size each. Rank zero, before a resumed run saves again."""
    leftovers = sorted(checkpoint_dir(out).glob(".step*.ckpt*.tmp"))
    if not leftovers:
        return
    size = sum(f.stat().st_size for p in leftovers for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    for p in leftovers:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    say(f"removed {len(leftovers)} partial checkpoint write{'s' * (len(leftovers) != 1)} left by an interrupted "
        f"save ({size / 2**20:,.1f} MiB) from {checkpoint_dir(out)}")


def link_last(target: Path) -> None:
    """Point last.ckpt beside `target` at it, atomically (a symlink swapped in by rename)."""
    import threading

    target = Path(target)
    tmp = target.parent / f".{LAST}.tmp{os.getpid()}-{threading.get_ident()}"  # a background save links too
    tmp.unlink(missing_ok=True)
    os.symlink(target.name, tmp)
    last = target.parent / LAST
    if last.is_dir() and not last.is_symlink():  # a copied run (copytree, some syncs) holds the linked sharded
        shutil.rmtree(last)  # checkpoint itself there: a second copy of a step directory, which a link cannot replace
    os.replace(tmp, last)


def link_newest(target: Path) -> None:
    """Point last.ckpt at `target` (once it exists) unless it already points at a later step: a background save
    completes after the loop has moved on, and must not turn the link back to an older step."""
    target = Path(target)
    last = target.parent / LAST
    current = step_of(Path(os.readlink(last))) if last.is_symlink() else None
    if target.exists() and (current is None or (step_of(target) or 0) >= current or not last.exists()):
        link_last(target)


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """Load with `weights_only=True`: tensors and plain data only, no arbitrary pickled code. `mmap`: tensors are
    mapped from the file, read only when touched (for reading a checkpoint's metadata). A sharded checkpoint gives
    its `meta.pt` with the whole model's `state_dict` (not with `mmap`: then only the metadata) and no optimizer
    state."""
    if is_sharded(path):
        return _load_sharded(Path(path), weights=not mmap)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise SodaError(f"{path}: checkpoint not found") from None
    except Exception as e:  # a truncated or foreign file
        raise SodaError(f"{path}: not a loadable checkpoint ({first_line(e, 200, with_type=True)})") from None


def _load_sharded(path: Path, weights: bool) -> dict:
    if (reason := _torn_reason(path)) is not None:
        raise SodaError(f"{path}: not a loadable checkpoint ({reason})")
    ckpt = torch.load(path / LIGHTNING_META, map_location="cpu", weights_only=True)
    if weights:
        names = list(_model_tensors(_read_index(path)))
        ckpt["state_dict"] = {k.removeprefix("state_dict."): v for k, v in _read_tensors(path, names).items()}
    return ckpt


def _model_tensors(index) -> dict:
    """The model's tensors in a DCP index (name -> TensorStorageMetadata), without the optimizer's."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {k: v for k, v in index.state_dict_metadata.items()
            if k.startswith("state_dict.") and isinstance(v, TensorStorageMetadata)}


def _read_tensors(path: Path, names: list[str], index=None) -> dict[str, torch.Tensor]:
    """The whole tensors `names` (DCP names, e.g. `state_dict.model.lm_head.weight`) of a sharded checkpoint, read in
    this process alone (no process group): each from whichever ranks' files hold its pieces."""
    import torch.distributed.checkpoint as dcp

    index = index or _read_index(path)
    meta = index.state_dict_metadata
    tensors = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype) for k in names}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    except Exception as e:  # a damaged shard file
        raise SodaError(f"{path}: cannot read the checkpoint's shards ({first_line(e, 200, with_type=True)})") from None
    return tensors


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
    """Write config, safetensors weights and tokenizer files that `AutoModelForCausalLM` loads, from a single-file or
    a sharded checkpoint (streamed: at most EXPORT_SHARD_BYTES of weights in memory; the optimizer's moments are
    never read).

    The vocabulary comes from `vocab`, or from a directory holding one (`vocab_dir`); without either, none is
    written."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    checkpoint = Path(checkpoint)
    sharded = is_sharded(checkpoint)
    ckpt = load_checkpoint(checkpoint, mmap=sharded)  # sharded: the metadata only; the weights are streamed below
    if "soda" not in ckpt:
        raise SodaError(f"{checkpoint}: not a soda-train checkpoint (no model config inside)")
    if architecture_of(ckpt) == "hierarchical":
        return _export_hierarchical(checkpoint, ckpt, Path(out_dir), vocab_dir, vocab)
    refuse_hierarchical(ckpt, checkpoint, "exported")
    config = Qwen3Config.from_dict(ckpt["soda"]["model_config"])
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    with atomic_directory(Path(out_dir)) as tmp:
        if sharded:
            _export_sharded_weights(checkpoint, model, tmp)
        else:
            state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
            if (bad := first_nonfinite(state)) is not None:
                raise SodaError(f"{checkpoint}: not exported: {bad} holds a NaN or Inf")
            model.load_state_dict(state, assign=True, strict=True)
            model.save_pretrained(str(tmp), safe_serialization=True)
        _export_beside(tmp, checkpoint, ckpt, vocab_dir, vocab)
    return Path(out_dir)


def _export_beside(tmp: Path, checkpoint: Path, ckpt: dict, vocab_dir: Path | None, vocab: Vocabulary | None) -> None:
    """What an export holds beside the weights (either family): the vocabulary and tokenizer files, soda.json (the
    codec) and a README naming the step."""
    if vocab is None and vocab_dir is not None:
        vocab = Vocabulary.load(Path(vocab_dir))
    if vocab is not None:
        vocab.save(tmp)  # vocab.json, text_tokenizer.json, tokenizer/
        for f in (tmp / "tokenizer").iterdir():  # tokenizer files beside the weights, as on the hub
            shutil.move(str(f), tmp / f.name)
        (tmp / "tokenizer").rmdir()
    atomic_write_text(tmp / SODA_META, json.dumps({"codec": ckpt["soda"].get("codec")}, indent=2))
    atomic_write_text(tmp / "README.md", f"Exported by soda-train from {checkpoint.name} "
                                         f"(step {ckpt.get('global_step', '?')}).\n")


def architecture_of(ckpt: dict) -> str:
    """The model family a soda-train checkpoint holds: "flat" (a Qwen3ForCausalLM) or "hierarchical"."""
    return ckpt.get("soda", {}).get("architecture", "flat")


def _export_hierarchical(checkpoint: Path, ckpt: dict, out_dir: Path, vocab_dir, vocab) -> Path:
    """A hierarchical checkpoint as `soda.hierarchical.save_export`'s directory (config.json naming model_type
    soda_hierarchical, model.safetensors) plus the same vocabulary, soda.json and README as a flat export. A sharded
    (FSDP) checkpoint's weights are gathered whole in this process (one model.safetensors: the family's export is
    one file), its optimizer state never read."""
    from soda.hierarchical import config_from_dict, save_export

    weights = load_checkpoint(checkpoint)["state_dict"] if is_sharded(checkpoint) else ckpt["state_dict"]
    state = {k.removeprefix("model."): v for k, v in weights.items()}
    if (bad := first_nonfinite(state)) is not None:
        raise SodaError(f"{checkpoint}: not exported: {bad} holds a NaN or Inf")
    with atomic_directory(out_dir) as tmp:
        try:
            save_export(config_from_dict(ckpt["soda"]["hierarchical_config"]), state, tmp)
        except (KeyError, TypeError, ValueError) as e:
            raise SodaError(f"{checkpoint}: not exported: {first_line(e, 200)}") from None
        _export_beside(tmp, checkpoint, ckpt, vocab_dir, vocab)
    return out_dir


HIERARCHICAL_REFUSED = ("a hierarchical model cannot be loaded here yet (soda-generate, soda-eval, soda-train export "
                        "and soda-train --architecture hierarchical --init-from read the hierarchical family; "
                        "fine-tuning reads only the flat family so far)")


def refuse_hierarchical(ckpt: dict, path: Path, what: str) -> None:
    """One line for a checkpoint of a family other than the flat one where only the flat family is read."""
    if architecture_of(ckpt) == "hierarchical":
        raise SodaError(f"{path}: {HIERARCHICAL_REFUSED}")
    if architecture_of(ckpt) != "flat":
        raise SodaError(f"{path}: a {ckpt['soda']['architecture']} checkpoint cannot be {what} (only the flat family "
                        f"can)")


def export_step(run: Path, step: int | None = None, out: Path | None = None, vocab_dir: Path | None = None) -> Path:
    """`soda-train export`: the run's checkpoint of `step` (default: its newest) as a Hugging Face directory, `out`
    (default `RUN/hf` for the newest step, else `RUN/hf-stepN`), with the vocabulary the run was trained on (from its
    data directories, or `vocab_dir`). Either layout; one line for a missing run or step or a torn checkpoint."""
    run = Path(run)
    if not checkpoint_dir(run).is_dir():
        raise SodaError(f"{run}: no such soda-train run (no {checkpoint_dir(run).name}/ directory)")
    steps = step_checkpoints(run)
    newest = max(steps) if steps else None
    if step is None:
        path = last_checkpoint(run)
        if path is None:
            raise SodaError(f"{run}: the run has no checkpoint yet")
        step = step_of(path) if step_of(path) is not None else step_of(path.resolve())  # last.ckpt: its target
    elif step not in steps:
        saved = ", ".join(map(str, steps)) or "none"
        raise SodaError(f"--step {step}: {run} has no checkpoint of that step; saved steps: {saved}")
    else:
        path = steps[step]
    if (reason := unreadable_reason(path)) is not None:
        raise SodaError(f"{path}: cannot be exported ({reason})")
    if out is None:
        out = run / "hf" if step in (None, newest) else run / f"hf-step{step}"
    if vocab_dir is not None:
        vocab = Vocabulary.load(Path(vocab_dir))
    else:
        meta = load_checkpoint(path, mmap=True)
        try:
            vocab = _run_vocabulary(run.resolve(), meta["soda"]["vocab"], path)
        except SodaError:
            raise SodaError(f"{path}: cannot find the vocabulary it was trained with in the run's data directories; "
                            f"give its directory with --vocab") from None
    return export_hf(path, Path(out), vocab=vocab)


def _export_sharded_weights(checkpoint: Path, model: torch.nn.Module, out: Path) -> None:
    """The model's weights from a sharded checkpoint as Hugging Face safetensors, a group of tensors at a time:
    `model.safetensors`, or above EXPORT_SHARD_BYTES `model-0000i-of-0000n.safetensors` with the index
    `model.safetensors.index.json` (the layout `save_pretrained` writes for large models), plus config.json and
    generation_config.json. `model` (on the meta device) gives the names and shapes the weights must have."""
    from safetensors.torch import save_file

    index = _read_index(checkpoint)
    stored = _model_tensors(index)
    expected = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:  # save_pretrained leaves the tied copy out
        expected.pop("lm_head.weight", None)
    names = {k: f"state_dict.model.{k}" for k in expected}
    missing = sorted(k for k, dcp_name in names.items() if dcp_name not in stored)
    if missing:
        raise SodaError(f"{checkpoint}: not exported: the checkpoint lacks {missing[0]} ({len(missing)} tensors)")
    for k, dcp_name in names.items():
        if tuple(stored[dcp_name].size) != tuple(expected[k].shape):
            raise SodaError(f"{checkpoint}: not exported: {k} is {tuple(stored[dcp_name].size)} in the checkpoint, "
                            f"the model config needs {tuple(expected[k].shape)}")
    groups: list[list[str]] = [[]]
    size = 0
    for k in names:
        nbytes = math.prod(stored[names[k]].size) * stored[names[k]].properties.dtype.itemsize
        if groups[-1] and size + nbytes > EXPORT_SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    files = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map, total = {}, 0
    dtype = None
    for group, file in zip(groups, files):
        tensors = _read_tensors(checkpoint, [names[k] for k in group], index)
        tensors = {k: tensors[names[k]].contiguous() for k in group}
        if (bad := first_nonfinite(tensors)) is not None:
            raise SodaError(f"{checkpoint}: not exported: {bad} holds a NaN or Inf")
        dtype = dtype or next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(files) > 1:
        atomic_write_text(out / "model.safetensors.index.json", json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if dtype is not None:
        model.config.dtype = dtype
    model.config.save_pretrained(str(out))
    if model.can_generate():
        model.generation_config.save_pretrained(str(out))


# --------------------------------------------------------------------------------------------
# Loading a model for generation and evaluation
# --------------------------------------------------------------------------------------------
# SODA's released models were tokenized with Mimi's first 8 codebooks of 2048 codes.
SODA_CODEC = "mimi"
SODA_CODEBOOKS, SODA_CODEBOOK_SIZE = 8, 2048


@dataclass
class LoadedModel:
    model: torch.nn.Module | None  # Qwen3ForCausalLM (or any causal LM; a HierarchicalModel where the caller reads
    # that family: load_model's `hierarchical`), in eval mode on `device`; None: weights=False
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
               attention: str = "sdpa", weights: bool = True, hierarchical: bool = False) -> LoadedModel:
    """Resolve CHECKPOINT (see module docstring); `codec` overrides the recorded codec. `weights=False` reads only
    the config, vocabulary and codec (`model` is None): what checking and encoding data against a model needs,
    without loading gigabytes of weights that training will load again.

    `hierarchical=True`: the caller reads the hierarchical family too, so an export of it (config.json's model_type
    `soda.hierarchical.MODEL_TYPE`; a run's `hf/`) or a hierarchical `.ckpt` gives a `soda.hierarchical.
    HierarchicalModel` (`is_hierarchical(loaded)`). Without it such a model is refused in one line (callers that
    expect a causal LM)."""
    from soda.hierarchical import HierarchicalConfig

    dev = resolve_device(device)
    dtype = dtype or default_dtype(dev)
    path = resolve_checkpoint(source)
    if isinstance(path, str):
        model, config, vocab, meta = _from_hf(path, None, dtype, attention, weights)
    elif is_checkpoint(path):
        model, config, vocab, meta = _from_checkpoint(path, dtype, attention, weights, hierarchical)
    elif _is_hierarchical_export(path):
        if not hierarchical:
            raise SodaError(f"{source}: {HIERARCHICAL_REFUSED}")
        model, config, vocab, meta = _from_hierarchical_export(path, dtype, attention, weights)
    else:
        model, config, vocab, meta = _from_hf(str(path), path, dtype, attention, weights)
    if isinstance(config, HierarchicalConfig):
        _check_hierarchical_vocabulary(source, config, vocab)
    elif config.vocab_size < vocab.size:
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
    """CHECKPOINT -> a `.ckpt` file, sharded `.ckpt` directory or model directory (Path), or a hub id (str); a run
    directory gives its `hf/` export, else its last checkpoint."""
    path = Path(source).expanduser()
    if _is_step_directory(path):
        return path
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


def is_checkpoint(path: Path) -> bool:
    """A soda-train checkpoint (a `.ckpt` file or a sharded step directory), as opposed to a model directory."""
    return Path(path).is_file() or _is_step_directory(Path(path))


def _is_step_directory(path: Path) -> bool:
    """A sharded checkpoint directory (complete or torn), as opposed to a run or model directory."""
    return is_sharded(path) and (path.suffix == ".ckpt" or (path / DCP_INDEX).is_file()
                                 or (path / LIGHTNING_META).is_file())


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".distcp")
_SAMPLE = 1 << 20  # bytes read from each end of a weight file


def model_fingerprint(source: str) -> dict:
    """What a CHECKPOINT argument names, recognisably, for outputs that must not mix models (soda-eval's
    results.json, soda-generate's --out): the resolved path and a digest of each weight file's name, size and
    first and last MiB. Reading the ends keeps it fast at any size, and a re-trained or replaced checkpoint differs
    there (its first tensors and its end), while a copy elsewhere has the same digest. A hub id is its own digest;
    a source that names no file (a model built in memory) is its name. An encoder-projector export counts its own
    weights (projector, adapter or merged LLM) and audio_llm.json, not the encoder and LLM it names by path."""
    import hashlib

    from soda.audio_llm import CONFIG_FILE

    try:
        target = encoder_projector_source(source) or resolve_checkpoint(source)
    except SodaError:
        return {"path": str(source), "digest": f"name:{source}"}
    if isinstance(target, str):
        return {"path": target, "digest": f"hub:{target}"}
    if target.is_file():
        files = [target]
    else:
        family = (target / CONFIG_FILE).is_file()
        folders = [target] + ([target / "adapter", target / "llm"] if family else [])
        names = ("config.json", DCP_INDEX) + ((CONFIG_FILE, "adapter_config.json") if family else ())
        files = sorted(p for d in folders if d.is_dir() for p in d.iterdir()
                       if p.suffix in WEIGHT_SUFFIXES or p.name in names)
    digest, total = hashlib.sha256(), 0
    for f in files:
        size = f.stat().st_size
        total += size
        name = f.name if target.is_file() else f.relative_to(target).as_posix()  # a native directory: its names
        digest.update(f"{name}:{size}:".encode())
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


def _from_checkpoint(path: Path, dtype, attention, weights: bool = True, hierarchical: bool = False):
    """A soda-train checkpoint: the model from its stored config; the vocabulary from the run's data."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    ckpt = load_checkpoint(path, mmap=not weights)  # mapped: the tensors are not read unless used
    if "soda" not in ckpt:
        raise SodaError(f"{path}: not a soda-train checkpoint (no model config inside)")
    if hierarchical and architecture_of(ckpt) == "hierarchical":
        return _hierarchical_from_checkpoint(path, ckpt, dtype, attention, weights)
    refuse_hierarchical(ckpt, path, "loaded for generation, evaluation or fine-tuning")
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


# --------------------------------------------------------------------------------------------
# The hierarchical family (soda.hierarchical): its exports and checkpoints
# --------------------------------------------------------------------------------------------
def is_hierarchical(loaded: LoadedModel) -> bool:
    """Whether `load_model(..., hierarchical=True)` gave a `soda.hierarchical.HierarchicalModel`."""
    from soda.hierarchical import HierarchicalModel

    return isinstance(loaded.model, HierarchicalModel)


def family_of(source: str) -> str | None:
    """The model family a CHECKPOINT argument names, "flat" or "hierarchical", from its config alone (no weights
    read): a hub id is flat (the hierarchical family is only ever a local export or checkpoint); None where `source`
    names no model."""
    try:
        path = resolve_checkpoint(source)
    except SodaError:
        return None
    if isinstance(path, str):
        return "flat"
    if is_checkpoint(path):
        return architecture_of(load_checkpoint(path, mmap=True))
    if _is_hierarchical_export(path):
        return "hierarchical"
    return "flat" if (path / "config.json").is_file() else None


def _is_hierarchical_export(path: Path) -> bool:
    from soda.hierarchical import is_export

    return is_export(path)


def _from_hierarchical_export(path: Path, dtype, attention, weights: bool = True):
    """A hierarchical export (`_export_hierarchical`): config.json, model.safetensors, vocab.json and soda.json."""
    from safetensors import SafetensorError

    from soda.hierarchical import load_export, read_export_config

    if not (path / "vocab.json").is_file():
        raise SodaError(f"{path}: a hierarchical export without vocab.json (export it again with soda-train export)")
    try:
        config = read_export_config(path)
        model = None
        if weights:
            check_weight_files(path)
            model = load_export(path, dtype, attention)
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as e:
        raise SodaError(f"{path}: cannot load the hierarchical model ({first_line(e, 200)})") from None
    meta = json.loads((path / SODA_META).read_text()) if (path / SODA_META).is_file() else {}
    return model, config, Vocabulary.load(path), meta


def _hierarchical_from_checkpoint(path: Path, ckpt: dict, dtype, attention, weights: bool = True):
    """A hierarchical soda-train checkpoint: the model from its stored config; the vocabulary from the run's data."""
    from dataclasses import replace

    from soda.hierarchical import HierarchicalModel, config_from_dict

    config = config_from_dict(ckpt["soda"]["hierarchical_config"])
    if attention in ("sdpa", "eager"):
        config = replace(config, attention=attention)
    model = None
    if weights:
        model = HierarchicalModel(config)
        model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}, strict=True)
        model.to(dtype)
    vocab = _run_vocabulary(path.resolve().parent.parent, ckpt["soda"]["vocab"], path)
    return model, config, vocab, {"codec": ckpt["soda"].get("codec")}


def _check_hierarchical_vocabulary(source: str, config, vocab: Vocabulary) -> None:
    shape = config.shape
    mine = (shape.backbone.vocab, shape.n_codebooks, shape.codebook_size, config.text_size)
    theirs = (vocab.size, vocab.n_codebooks, vocab.codebook_size, vocab.text_size)
    if mine != theirs:
        raise SodaError(f"{source}: the hierarchical model was built for (ids, codebooks, codebook size, text size) "
                        f"{mine}; its vocabulary has {theirs}")


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


# --------------------------------------------------------------------------------------------
# The encoder-projector family (soda.audio_llm): its exports, runs and checkpoints
# --------------------------------------------------------------------------------------------
def encoder_projector_source(source: str) -> Path | None:
    """What an encoder-projector CHECKPOINT argument names: an export directory (audio_llm.json; a run's RUN/hf),
    a run directory without an export (its newest checkpoint), or one of its `.ckpt` files; None for a native model."""
    from soda.audio_llm import export_of, read_trainable

    export = export_of(source)
    if export is not None:
        return export
    path = Path(str(source)).expanduser()
    if _is_step_directory(path) and _is_encoder_projector_run(path.resolve().parent.parent):
        raise SodaError(f"{source}: a sharded (FSDP) checkpoint of an encoder-projector run; load the run's export "
                        f"(RUN/hf, written when the run ends)")
    if path.is_dir() and not (path / "hf").exists() and _is_encoder_projector_run(path):
        newest = last_checkpoint(path)
        if newest is None:
            raise SodaError(f"{source}: an encoder-projector run with no checkpoint yet")
        return encoder_projector_source(str(newest))
    if path.is_file() and path.suffix == ".ckpt":
        try:
            read_trainable(load_checkpoint(path, mmap=True), path)
        except SodaError:
            return None
        return path
    return None


def _is_encoder_projector_run(run: Path) -> bool:
    import yaml

    config = run / "config.yaml"
    return config.is_file() and (yaml.safe_load(config.read_text()) or {}).get("architecture") == "encoder-projector"


def load_encoder_projector(source: str, device: str = "auto"):
    """CHECKPOINT of the encoder-projector family -> `EncoderProjectorModel` in eval mode on `device` (fp32 on CPU,
    bf16 on GPUs that have it), with `.source` naming what was loaded."""
    from soda.audio_llm import EncoderProjectorModel, load, read_trainable

    target = encoder_projector_source(source)
    if target is None:
        raise SodaError(f"{source}: not an encoder-projector export, run or checkpoint")
    if target.is_dir():
        model = load(target)
    else:
        config, state = read_trainable(load_checkpoint(target), target)
        model = EncoderProjectorModel(config, trainable=True)  # fresh LoRA, then the run's tensors
        model.load_trainable_state(state)
        model.requires_grad_(False)
    dev = resolve_device(device)
    model.source = str(source)
    return model.to(dev, dtype=default_dtype(dev)).eval()
