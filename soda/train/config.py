"""Training settings as data: size presets, SODA's recipe defaults, YAML files and "500B" counts.

One `TrainConfig` holds every knob of a run. Defaults are SODA's recipe; a YAML file (see
`configs/`) overrides them, and command-line flags override the file. The resolved config is
saved in the run directory, so a run can always be reproduced and resumed from it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from soda.shape import SHAPE_FIELDS, SIZES, ModelShape
from soda.train.optim import WEIGHT_DECAY_MODES
from tokenize_audio.errors import SodaError

REPO = Path(__file__).resolve().parents[2]
DEMO_CORPUS = REPO / "demo" / "corpus"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
CONFIG_FILE = "config.yaml"
# Settings that may change when a run is resumed (how it runs, not what it computes).
RESUMABLE_CHANGES = {"max_steps", "val_every", "val_batches", "ckpt_every", "log_every", "workers", "devices",
                     "num_nodes", "strategy", "accelerator", "micro_batch", "precision", "wandb",
                     "skip_bad_shards", "on_nonfinite", "peak_flops", "export", "out",
                     "sample_every", "sample_max_seconds"}
# Recipe settings a resumed run may change to recover (a lower LR after a divergence, tighter clipping): the change
# is printed, written to config.yaml and appended to config_changes.jsonl with the step it took effect at.
ADJUSTABLE_ON_RESUME = ("lr", "grad_clip", "z_loss", "weight_decay")
CHANGES_FILE = "config_changes.jsonl"
# Settings added after runs were saved without them: the value those runs were trained with.
PREDATES = {"weight_decay_mode": "adamw"}

SCHEDULES = ("wsd", "cosine")
LOSS_MARKERS = ("text_start", "text_end", "audio_start", "audio_end")  # Vocabulary attribute names
_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(value, what: str = "count") -> int:
    """'500B' -> 500_000_000_000; also plain numbers and '2.1M', '3e9'."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMBGTkmbgt]?)\s*", str(value))
        if not m:
            raise SodaError(f"{what} {value!r}: expected a number with an optional K/M/B/T suffix, e.g. 500B")
        number = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if not math.isfinite(number) or number <= 0:
        raise SodaError(f"{what} {value!r}: must be positive")
    return int(round(number))


def soda_peak_lr(batch_sequences: int, width: int) -> float:
    """SODA: 0.003 * sqrt(batch/256) * sqrt(1024/width), width floored at 1024."""
    return 0.003 * math.sqrt(batch_sequences / 256) * math.sqrt(1024 / max(width, 1024))


@dataclass
class TrainConfig:
    # --- model --------------------------------------------------------------------------------
    size: str | None = None              # a SIZES preset; explicit shape fields below override it
    sweep_width: int | None = None       # SODA's sweep rule from a width (layers, heads, FFN derived)
    width: int | None = None
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    ffn: int | None = None
    rope_theta: float = 500_000.0        # Llama-3.1-style RoPE scaling, as SODA
    rope_factor: float = 8.0
    init_from: str | None = None         # HF directory or hub id to start from
    attention: str = "auto"              # auto | sdpa | eager | flash_attention_2 | flex_attention
    compile: bool = False                # torch.compile each decoder layer and the loss's chunk arithmetic
    activation_checkpointing: bool = False  # recompute each decoder layer's activations in the backward pass
    # --- data ---------------------------------------------------------------------------------
    data: list = field(default_factory=list)        # [NAME=]LOCATION strings or {name, path, kind, weight}
    val_data: list = field(default_factory=list)
    mix: dict = field(default_factory=dict)         # source name -> weight
    vocab: str | None = None             # directory with vocab.json when the data are bare shard URLs
    seq_len: int = 4096
    workers: int = 2
    skip_bad_shards: bool = False
    # --- recipe -------------------------------------------------------------------------------
    tokens: str | int = "500B"
    batch_tokens: str | int = 512 * 4096
    micro_batch: int | None = None       # sequences per device per forward; None = fit the batch in one
    lr: float | None = None              # None = SODA's rule
    betas: tuple = (0.98, 0.98)
    eps: float = 1e-16
    weight_decay: float = 0.033
    weight_decay_mode: str = "adamc"     # adamc (SODA: decay scaled by lr_t / lr_peak) | adamw (plain decoupled)
    cautious: bool = True
    grad_clip: float = 1.0
    z_loss: float = 1e-4
    schedule: str = "wsd"                # wsd (pre-training) | cosine (SODA's fine-tuning)
    warmup: float = 0.1                  # fractions of the steps
    decay: float = 0.2                   # wsd only: the final linear decay
    loss_after: str | None = None        # score only targets after a document's first such marker (e.g.
                                         # text_end: an S2ST document's target); None = every token
    seed: int = 0
    epochs: float | None = None          # soda-finetune: passes over its data that --tokens was derived from
    # --- run ----------------------------------------------------------------------------------
    out: str = "runs/demo"
    max_steps: int | None = None         # stop early (the schedule still follows --tokens)
    val_every: int = 1000
    val_batches: int = 50
    ckpt_every: int = 1000
    log_every: int = 10
    sample_every: int | None = None      # generate the sample prompts every N steps (soda.samples); None: at
                                         # each checkpoint when the data's codec is known; 0: off
    sample_max_seconds: float = 60.0     # wall-clock budget of one sampling round
    precision: str = "auto"             # auto = bf16-mixed on GPU, fp32 on CPU
    accelerator: str = "auto"
    strategy: str = "auto"
    devices: str | int = "auto"
    num_nodes: int = 1
    peak_flops: float | None = None      # per device, for MFU; default from Lightning's GPU table
    on_nonfinite: str = "stop"           # stop | skip
    wandb: str | None = None             # W&B project name
    export: bool = True                  # write the HF export at the end

    def shape(self, vocab: int) -> ModelShape:
        if self.sweep_width:
            base = ModelShape.sweep(self.sweep_width, vocab, self.seq_len)
            values = dict(zip(SHAPE_FIELDS, (base.width, base.layers, base.heads, base.kv_heads,
                                              base.head_dim, base.ffn)))
        elif self.size:
            if self.size not in SIZES:
                raise SodaError(f"unknown --size {self.size!r}; choose from {', '.join(SIZES)}")
            values = dict(zip(SHAPE_FIELDS, SIZES[self.size]))
        else:
            values = {}
        values.update({k: getattr(self, k) for k in SHAPE_FIELDS if getattr(self, k) is not None})
        missing = [k for k in SHAPE_FIELDS if values.get(k) is None]
        if missing:
            raise SodaError(f"model shape incomplete: give --size, --sweep-width, or all of {', '.join(missing)}")
        if values["heads"] % values["kv_heads"]:
            raise SodaError(f"heads ({values['heads']}) must be a multiple of kv_heads ({values['kv_heads']})")
        return ModelShape(**values, vocab=vocab, seq_len=self.seq_len)

    @property
    def total_tokens(self) -> int:
        return parse_count(self.tokens, "--tokens")

    @property
    def batch_sequences(self) -> int:
        seqs = parse_count(self.batch_tokens, "--batch-tokens") / self.seq_len
        return max(1, round(seqs))

    @property
    def steps(self) -> int:
        """Optimizer steps of the whole schedule (the LR schedule is laid out over these)."""
        return max(1, round(self.total_tokens / (self.batch_sequences * self.seq_len)))

    @property
    def device_count(self) -> int | None:
        """Devices per node as a count; None for auto (all this node has)."""
        if self.devices in ("auto", None, "-1", -1):
            return None
        try:
            n = int(self.devices)
        except ValueError:
            raise SodaError(f"--devices {self.devices!r}: give a count or auto") from None
        if n < 1:
            raise SodaError(f"--devices {self.devices!r}: give a count of at least 1, or auto")
        return n

    def uses_gpu(self) -> bool:
        """Whether this run trains on CUDA devices (`--accelerator auto|gpu|cuda` with CUDA present)."""
        import torch

        return self.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()

    def peak_lr(self, width: int) -> float:
        return self.lr if self.lr is not None else soda_peak_lr(self.batch_sequences, width)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_yaml(path: Path) -> dict:
    """Read a YAML config; unknown keys are an error (a typo must not silently do nothing)."""
    path = Path(path)
    if not path.is_file():
        raise SodaError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SodaError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise SodaError(f"{path}: expected a mapping of settings at the top level")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(config_fields()))
    if unknown:
        raise SodaError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return values


def _coerce(name: str, value, annotation: str):
    """A setting from YAML as its field's type: YAML reads `lr: 3e-4` as a string, and `seq_len: 4096.0` as a
    float. Anything else of the wrong type is a one-line error naming the setting."""
    kind = annotation.removesuffix(" | None")
    wants = {"bool": "true or false", "int": "a whole number", "float": "a number", "tuple": "a list of numbers"}
    if kind not in wants:
        return value
    try:
        if isinstance(value, bool) != (kind == "bool"):  # true is not 1, and 1 is not true
            raise ValueError
        if kind == "bool":
            return value
        if kind == "int" and float(value) == int(float(value)):
            return int(float(value))
        if kind == "float":
            return float(value)
        if kind == "tuple" and isinstance(value, (list, tuple)):  # betas
            return tuple(float(v) for v in value)
    except (TypeError, ValueError, OverflowError):
        pass
    raise SodaError(f"setting {name}: {value!r} is not {wants[kind]}")


def make_config(*layers: dict) -> TrainConfig:
    """Later layers override earlier ones; None means 'not given'."""
    merged: dict = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for name, value in merged.items():
        if name in types:
            merged[name] = _coerce(name, value, types[name])
    cfg = TrainConfig(**merged)
    validate(cfg)
    return cfg


# Lowest allowed value of each numeric setting (None = not given, allowed). Zero where zero means "off".
AT_LEAST = {"seq_len": 2, "max_steps": 1, "micro_batch": 1, "num_nodes": 1, "workers": 0, "val_every": 1,
            "val_batches": 0, "ckpt_every": 1, "log_every": 1, "sample_every": 0, "sweep_width": 1,
            **{name: 1 for name in SHAPE_FIELDS}, "weight_decay": 0, "grad_clip": 0, "z_loss": 0}
ABOVE_ZERO = ("lr", "eps", "peak_flops", "epochs", "sample_max_seconds")


def validate(cfg: TrainConfig) -> None:
    """Refuse a nonsensical setting before anything starts, naming its flag (a negative clip would flip every
    gradient; a zero interval would divide by zero mid-run)."""
    for name, low in AT_LEAST.items():
        value = getattr(cfg, name)
        if value is not None and not value >= low:
            raise SodaError(f"--{name.replace('_', '-')} {value}: must be at least {low}")
    for name in ABOVE_ZERO:
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise SodaError(f"--{name.replace('_', '-')} {value}: must be positive")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise SodaError(f"betas {list(cfg.betas)}: give two numbers in [0, 1)")
    cfg.device_count  # parse now: "--devices 0" fails here, not as a division by zero
    if not 0 <= cfg.warmup <= 1 or not 0 <= cfg.decay <= 1 or cfg.warmup + cfg.decay > 1:
        raise SodaError(f"warmup {cfg.warmup} and decay {cfg.decay} must be fractions summing to at most 1")
    if cfg.schedule not in SCHEDULES:
        raise SodaError(f"schedule {cfg.schedule!r}: choose {' or '.join(SCHEDULES)}")
    if cfg.loss_after is not None and cfg.loss_after not in LOSS_MARKERS:
        raise SodaError(f"loss_after {cfg.loss_after!r}: choose one of {', '.join(LOSS_MARKERS)}")
    if cfg.weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise SodaError(f"weight_decay_mode {cfg.weight_decay_mode!r}: choose {' or '.join(WEIGHT_DECAY_MODES)}")
    if cfg.on_nonfinite not in ("stop", "skip"):
        raise SodaError(f"on_nonfinite {cfg.on_nonfinite!r}: choose stop or skip")
    cfg.total_tokens, cfg.batch_sequences  # parse now: a bad count fails before anything starts
