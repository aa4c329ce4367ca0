"""Load a trained model for generation and evaluation, whatever form it comes in.

A CHECKPOINT argument may be a soda-train run directory (its `hf/` export, or its last checkpoint), a
`.ckpt` file, a Hugging Face model directory (a soda-train export, or SODA's release layout), or a hub id
such as `soda-research/soda-135m-base`. What comes back is the model, the vocabulary that gives its ids a
meaning, and the codec its audio ids came from (so audio is encoded and decoded with the same one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenize_audio.codecs import resolve_device
from tokenize_audio.errors import SodaError
from tokenize_audio.vocab import Vocabulary

from .checkpoints import LAST, SODA_META, check_weight_files, last_checkpoint, load_checkpoint

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


def _from_hf(name: str, path: Path | None, dtype, attention, weights: bool = True):
    from transformers import AutoConfig, AutoModelForCausalLM

    from safetensors import SafetensorError

    try:
        if weights:
            if path is not None:
                check_weight_files(path)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=attention)
            config = model.config
        else:
            model, config = None, AutoConfig.from_pretrained(name)
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a damaged file in the hub cache
        raise SodaError(f"{name}: cannot load the model ({str(e).strip().splitlines()[0][:200]})") from None
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
        raise SodaError(f"{name}: no usable tokenizer.json ({str(e).strip().splitlines()[0][:200]})") from None
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
