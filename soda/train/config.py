"""Training settings as data: size presets, SODA's recipe defaults, YAML files and "500B" counts.

One `TrainConfig` holds every knob of a run. Defaults are SODA's recipe; a YAML file (see
`configs/`) overrides them, and command-line flags override the file. The resolved config is
saved in the run directory, so a run can always be reproduced and resumed from it. Each field
declares its flag, help, bounds and resume rule (`soda.settings.setting`): soda-train's and
soda-finetune's flags, the YAML keys, the bounds and resume checks and the sweep's reserved flags
are all read from these declarations.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from soda.loss_weights import LOSS_WEIGHTS
from soda.settings import ADJUSTABLE, RESUMABLE, add_arguments, check_bounds, flag_of, names_with, setting
from soda.shape import SHAPE_FIELDS, SIZES, ModelShape
from tokenize_audio.errors import SodaError, first_line

REPO = Path(__file__).resolve().parents[2]
DEMO_CORPUS = REPO / "demo" / "corpus"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
CONFIG_FILE = "config.yaml"
CHANGES_FILE = "config_changes.jsonl"

SCHEDULES = ("wsd", "cosine")
WEIGHT_DECAY_MODES = ("adamc", "adamw")  # soda.train.optim: AdamC (SODA) or plain decoupled decay
ON_NONFINITE = ("stop", "skip")
ARCHITECTURES = ("flat", "hierarchical")  # soda.model's flattened Qwen3ForCausalLM; soda.hierarchical's family
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


def _shape_field():
    return setting(None, type=int, at_least=1, sweep="reserved", help="override the preset's value")


@dataclass
class TrainConfig:
    """Every knob of a run; each field's metadata (`soda.settings.setting`) gives its flag, help, bounds and whether
    a resumed run may change it. Field order is the order of the saved config.yaml."""

    # --- model --------------------------------------------------------------------------------
    size: str | None = setting(None, group="model", help=f"preset: {', '.join(SIZES)}", sweep="reserved")
    sweep_width: int | None = setting(  # SODA's sweep rule from a width (layers, heads, FFN derived)
        None, type=int, at_least=1, sweep="reserved",
        help="SODA's IsoFLOP sweep shape from a width (layers, heads, FFN derived)")
    width: int | None = _shape_field()
    layers: int | None = _shape_field()
    heads: int | None = _shape_field()
    kv_heads: int | None = _shape_field()
    head_dim: int | None = _shape_field()
    ffn: int | None = _shape_field()
    rope_theta: float = setting(500_000.0, flag=False)  # Llama-3.1-style RoPE scaling, as SODA
    rope_factor: float = setting(8.0, flag=False)
    init_from: str | None = setting(None, sweep="reserved", help="start from this Hugging Face directory or hub id "
                                    "(e.g. an export of another run, or soda-research/soda-600m-base); --architecture "
                                    "hierarchical: a hierarchical export, run directory or .ckpt. The model's shape "
                                    "is its own (the size flags are not used)")
    attention: str = setting("auto", help="auto (flex_attention on GPU: block-sparse document masks; sdpa on CPU), "
                             "sdpa, eager, flash_attention_2 (if installed), flex_attention")
    compile: bool = setting(False, action="store_true",
                            help="torch.compile each decoder layer and the loss's per-chunk arithmetic (fused kernels: "
                                 "faster on GPU after a minute or two of compiling; off by default)")
    activation_checkpointing: bool = setting(
        False, action="store_true",
        help="recompute each decoder layer's activations during the backward pass instead of keeping them: about a "
             "third more compute for far less memory (large models, long sequences, bigger micro-batches)")
    architecture: str = setting(
        "flat", choices=ARCHITECTURES, sweep="reserved",
        help="flat (default: one Qwen3 over the flattened token stream, 8 tokens per audio frame) or hierarchical "
             "(soda.hierarchical: a Qwen3 backbone over steps, one per text token or audio frame, plus a small depth "
             "decoder over each frame's codebooks), whose windows are --seq-len steps (sdpa or eager attention)")
    depth_width: int | None = setting(None, type=int, at_least=1, sweep="reserved",
                                      help="hierarchical: the depth decoder's width (default: backbone width // 2)")
    depth_layers: int = setting(4, type=int, at_least=1, sweep="reserved",
                                help="hierarchical: the depth decoder's layers (default 4)")
    # --- data ---------------------------------------------------------------------------------
    data: list = setting(  # [NAME=]LOCATION strings or {name, path, kind, weight}
        factory=list, group="data", action="append", sweep="reserved",
        help="[NAME=]LOCATION, repeatable: a soda-tokenize output directory, a shard glob or brace pattern, or URLs "
             "(http://, s3 via pipe:, ...). NAME speech/text picks that kind of shard from a directory")
    val_data: list = setting(factory=list, action="append",
                             help="[NAME=]LOCATION of validation shards for pattern sources")
    mix: dict = setting(factory=dict,  # source name -> weight
                        help="mixture weights NAME=W,... e.g. speech=0.95,text=0.05 (default: by tokens), shares of "
                             "the windows (of tokens; of steps with --architecture hierarchical)")
    vocab: str | None = setting(None, help="directory with vocab.json, when --data gives only shard patterns")
    seq_len: int = setting(4096, type=int, at_least=2, sweep="reserved",
                           help="window length (default 4096): flat tokens, or with --architecture hierarchical "
                                "steps (a text token or an audio frame: 1024 = 82 s of Mimi audio; --tokens and "
                                "--batch-tokens count steps too)")
    workers: int = setting(2, type=int, at_least=0, resume=RESUMABLE, sweep="how",
                           help="dataloader workers per device")
    skip_bad_shards: bool = setting(False, action="store_true", resume=RESUMABLE,
                                    help="skip (and report) corrupt shards instead of stopping")
    # --- recipe -------------------------------------------------------------------------------
    tokens: str | int = setting("500B", group="recipe", sweep="reserved",
                                help="training tokens, e.g. 500B (K/M/B/T); the schedule spans them")
    batch_tokens: str | int = setting(512 * 4096, sweep="reserved",
                                      help="global batch in tokens (default 512 x 4096 = 2.1M)")
    micro_batch: int | None = setting(  # None = fit the batch in one forward
        None, type=int, at_least=1, resume=RESUMABLE, sweep="how",
        help="sequences per device per forward; gradients accumulate to the global batch")
    lr: float | None = setting(None, type=float, positive=True, resume=ADJUSTABLE, sweep="reserved",
                               help="peak LR (default: SODA's rule)")
    betas: tuple = setting((0.98, 0.98), flag=False)
    eps: float = setting(1e-16, flag=False, positive=True)
    weight_decay: float = setting(0.033, type=float, at_least=0, resume=ADJUSTABLE,
                                  help="decoupled weight decay of matrices (default 0.033; not norms, biases or the "
                                       "input embedding)")
    weight_decay_mode: str = setting(
        "adamc", choices=WEIGHT_DECAY_MODES, predates="adamw",
        help="adamc (default, SODA's: the decay follows the schedule, each step shrinks weights by "
             "lr_t * wd * lr_t / lr_peak) or adamw (plain decoupled: lr_t * wd)")
    cautious: bool = setting(True, flag="--no-cautious", action="store_false",
                             help="plain AdamW instead of cautious masking")
    grad_clip: float = setting(1.0, type=float, at_least=0, resume=ADJUSTABLE)
    z_loss: float = setting(1e-4, type=float, at_least=0, resume=ADJUSTABLE)
    loss_weights: str = setting(
        "uniform", choices=LOSS_WEIGHTS,
        help="per-kind loss weights, either family: uniform (default), moshi (100 on text, specials and the semantic "
             "codebook 0, 1 on acoustic codebooks) or graded (100 there, 100^(1-k/7) on acoustic codebook k); the "
             "loss is sum w (nll + z-loss) / sum w; the logged NLL vector is always unweighted")
    schedule: str = setting("wsd", choices=SCHEDULES, help="LR schedule: wsd (default; warm-up, flat, linear decay) "
                                                           "or cosine (warm-up, then cosine to 0: SODA's fine-tuning)")
    warmup: float = setting(0.1, type=float, help="warm-up fraction of the steps (default 0.1)")
    decay: float = setting(0.2, type=float, help="wsd: final linear-decay fraction of the steps (default 0.2)")
    loss_after: str | None = setting(
        None, choices=LOSS_MARKERS,
        help="score only the tokens after each document's first such marker (e.g. text_end: an S2ST document's "
             "target); default: every token")
    seed: int = setting(0, type=int)
    # soda-finetune's --epochs (its own flag): passes over its data that --tokens was derived from
    epochs: float | None = setting(None, flag=False, positive=True)
    # --- run ----------------------------------------------------------------------------------
    out: str = setting("runs/demo", group="run", resume=RESUMABLE, sweep="reserved",
                       help="run directory (checkpoints, logs, metrics.csv, loss.png, hf/); default runs/demo")
    max_steps: int | None = setting(None, type=int, at_least=1, resume=RESUMABLE, sweep="reserved",
                                    help="stop after this many optimizer steps (the schedule still spans --tokens)")
    val_every: int = setting(1000, type=int, at_least=1, resume=RESUMABLE, group="hardware and logging",
                             help="validate every N optimizer steps")
    val_batches: int = setting(50, type=int, at_least=0, resume=RESUMABLE,
                               help="validation batches per check, each as large as the global batch (--batch-tokens): "
                                    "any number of GPUs validates on the same windows")
    ckpt_every: int = setting(1000, type=int, at_least=1, resume=RESUMABLE, sweep="how",
                              help="checkpoint every N optimizer steps")
    async_checkpoint: bool = setting(
        False, action="store_true", resume=RESUMABLE, sweep="how",
        help="write checkpoints in the background while training goes on (a copy of the state in CPU memory "
             "first; one save in flight); pre-emption and the end of the run wait for it")
    log_every: int = setting(10, type=int, at_least=1, resume=RESUMABLE, sweep="how",
                             help="write metrics every N steps")
    sample_every: int | None = setting(
        None, type=int, at_least=0, resume=RESUMABLE,
        help="every N steps, generate a fixed, seeded set of prompts (TTS sentences, a continuation and an ASR of a "
             "held-out utterance) into RUN/samples/step_N/ (wav + samples.json) and TensorBoard/W&B (default: at "
             "each checkpoint when the data's codec is known; 0: off)")
    sample_max_seconds: float = setting(60.0, type=float, positive=True, resume=RESUMABLE,
                                        help="wall-clock budget of one sampling round (default 60)")
    precision: str = setting("auto", resume=RESUMABLE, sweep="how",
                             help="auto (bf16-mixed on GPU, 32-true on CPU), 32-true, bf16-mixed")
    accelerator: str = setting("auto", resume=RESUMABLE, sweep="how", help="auto, cpu, gpu")
    strategy: str = setting("auto", resume=RESUMABLE, sweep="how",
                            help="auto, ddp, fsdp (FSDP2: parameters, gradients and optimizer state sharded over the "
                                 "ranks; for models that do not fit one device with DDP)")
    devices: str | int = setting("auto", resume=RESUMABLE, sweep="how", help="devices per node (auto, or a count)")
    num_nodes: int = setting(1, type=int, at_least=1, resume=RESUMABLE, sweep="how")
    peak_flops: float | None = setting(None, type=float, positive=True, resume=RESUMABLE, sweep="how",
                                       help="peak FLOP/s per device for MFU (default: from the GPU name)")
    on_nonfinite: str = setting(
        "stop", choices=ON_NONFINITE, resume=RESUMABLE, group="recipe",
        help="a step whose loss or gradient norm is NaN/Inf never updates the weights; then stop (default; the last "
             "checkpoint is finite: resume with a lower --lr) or skip the update and go on (train/skipped_steps)")
    wandb: str | None = setting(None, resume=RESUMABLE, sweep="how", group="hardware and logging",
                                help="also log to this Weights & Biases project")
    export: bool = setting(True, flag="--no-export", action="store_false", resume=RESUMABLE,
                           help="skip the Hugging Face export at the end")

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


# Derived from the fields' metadata. Settings that may change when a run is resumed (how it runs, not what it
# computes); recipe settings a resumed run may change to recover (a lower LR after a divergence, tighter clipping):
# the change is printed, written to config.yaml and appended to CHANGES_FILE with the step it took effect at.
RESUMABLE_CHANGES = set(names_with(TrainConfig, "resume", RESUMABLE))
ADJUSTABLE_ON_RESUME = names_with(TrainConfig, "resume", ADJUSTABLE)
# Settings added after runs were saved without them: the value those runs were trained with.
PREDATES = {f.name: f.metadata["predates"] for f in dataclasses.fields(TrainConfig) if "predates" in f.metadata}


@dataclass
class RunOptions:
    """soda-train's options that are not settings of the run (not saved in config.yaml)."""

    config: Path | None = setting(None, type=Path, group="run", sweep="reserved",
                                  help="YAML file of settings (see configs/)")
    resume: str | None = setting(
        None, nargs="?", const="yes", choices=("yes", "auto"), sweep="reserved",
        help="continue the run in --out from its last checkpoint; --resume auto: continue if --out holds a checkpoint, "
             "else start (one command line for a job's first start and its re-queued restarts). A resumed run "
             "computes what it started to: only how it runs may change (devices, workers, logging, --max-steps...) "
             "and, to recover from a divergence, " + ", ".join(f"--{k.replace('_', '-')}" for k in ADJUSTABLE_ON_RESUME)
             + f" (each change is printed and recorded in the run's config.yaml and {CHANGES_FILE})")
    dry_run: bool = setting(False, action="store_true", sweep="reserved",
                            help="print the plan (sizes, FLOPs, steps, schedule, wall-clock estimates) and exit")
    mfu: float = setting(0.4, type=float, help="MFU assumed by --dry-run's wall-clock estimates")
    codec_rate: float | None = setting(
        None, type=float,
        help="--dry-run: audio-seconds the codec encodes per GPU-second (measure yours with "
             "benchmarks/tokenize_throughput.py --device cuda); with it the plan gives the GPU-hours that tokenizing "
             "the run's raw audio takes")


def add_train_arguments(p, skip=frozenset(), helps: dict | None = None) -> None:
    """soda-train's options on `p`, less the flags in `skip` (soda-finetune shares them), with `helps` overriding
    help texts by setting name; the settings default to None (not given: --config and the defaults decide)."""
    add_arguments(p, RunOptions, TrainConfig, skip=skip, helps=helps, unset=(TrainConfig,))


def sweep_flags(kind: str) -> set[str]:
    """soda-train's flags the IsoFLOP sweep reserves (kind "reserved": it sets them) or lets a re-run change
    ("how": how a run runs, not what it computes)."""
    return {flag_of(f) for cls in (RunOptions, TrainConfig) for f in dataclasses.fields(cls)
            if f.metadata["sweep"] == kind}


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
        raise SodaError(f"{path}: not valid YAML ({first_line(e)})") from None
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


def validate(cfg: TrainConfig) -> None:
    """Refuse a nonsensical setting before anything starts, naming its flag (a negative clip would flip every
    gradient; a zero interval would divide by zero mid-run): the fields' bounds, then what relates several."""
    check_bounds(cfg)
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
    if cfg.on_nonfinite not in ON_NONFINITE:
        raise SodaError(f"on_nonfinite {cfg.on_nonfinite!r}: choose stop or skip")
    cfg.total_tokens, cfg.batch_sequences  # parse now: a bad count fails before anything starts
    if cfg.architecture not in ARCHITECTURES:
        raise SodaError(f"architecture {cfg.architecture!r}: choose {' or '.join(ARCHITECTURES)}")
    if cfg.loss_weights not in LOSS_WEIGHTS:
        raise SodaError(f"loss_weights {cfg.loss_weights!r}: choose one of {', '.join(LOSS_WEIGHTS)}")
    if cfg.architecture == "flat" and cfg.depth_width is not None:
        raise SodaError("--depth-width applies to --architecture hierarchical only")
