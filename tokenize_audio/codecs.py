"""Neural audio codecs behind one small interface: waveform <-> codes [n_codebooks, frames].

Real codecs are transformers' `MimiModel` (SODA's codec: 1 semantic + 7 acoustic codebooks at
12.5 frames/s) and `EncodecModel` (acoustic only, 75 frames/s). The offline variants
`mimi:random` / `encodec:random` are seeded random initialisations with randomised codebooks, so
codes vary with the audio; they are chosen explicitly, never as a fallback, and every manifest
labels them as random.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from tokenize_audio.errors import SodaError, first_line

HUB_DEFAULTS = {"mimi": "kyutai/mimi", "encodec": "facebook/encodec_24khz"}
CODEC_CHOICES = "mimi, mimi:random, encodec, encodec:random, FAMILY:PATH_OR_HUB_ID, or a local model directory"
RANDOM_SEED = 0
DEFAULT_ENCODE_CHUNK_SECONDS = 60.0  # SODA cut YODAS segments at 60 s; longer audio is encoded in chunks
LEFT_CONTEXT_SECONDS = 5.0  # re-encoded before each chunk by codecs without streaming state (EnCodec)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise SodaError(f"unknown device {device!r} ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SodaError(f"--device {device} asked for CUDA but no GPU is available here")
    return dev


class Codec:
    """A neural codec: `encode(wave) -> codes [K, F]`, `decode(codes) -> wave`.

    `wave` is float32 mono at `sample_rate`. Encoding trims the wave to whole frames
    (`samples_per_frame`) so that right-padding cannot change earlier frames of a causal codec: batched
    and one-by-one Mimi codes are identical; EnCodec in fp32 differs on rare near-ties (<1%).
    A wave longer than `encode_chunk_seconds` is encoded chunk by chunk (`_encode_long`), so memory is
    bounded by the chunk, not the file.
    """

    family: str = ""

    def __init__(self, model, spec: str, source: str, n_codebooks: int, device: torch.device, random: bool,
                 encode_chunk_seconds: float = DEFAULT_ENCODE_CHUNK_SECONDS):
        self.model = model.eval().to(device)
        self.encode_chunk_seconds = encode_chunk_seconds
        self.spec = spec
        self.source = source
        self.random = random
        self.device = device
        self.n_codebooks = n_codebooks
        cfg = model.config
        self.sample_rate = int(cfg.sampling_rate)
        self.codebook_size = int(cfg.codebook_size)
        if n_codebooks < 1 or n_codebooks > self.max_codebooks:
            raise SodaError(f"--codebooks {n_codebooks}: codec {spec} has 1..{self.max_codebooks} codebooks")

    # --- facts about the codec -------------------------------------------------------------
    max_codebooks: int = 0
    samples_per_frame: int = 0

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.samples_per_frame

    @property
    def semantic_codebooks(self) -> tuple[int, ...]:
        return ()

    @property
    def tokens_per_second(self) -> float:
        return self.frame_rate * self.n_codebooks

    def describe(self) -> dict:
        """What a manifest records about this codec (enough to rebuild it with `load_codec`)."""
        label = f"{self.family} ({self.source})"
        if self.random:
            label = f"{self.spec}: RANDOM weights (seed {RANDOM_SEED}), an offline test codec, not {HUB_DEFAULTS[self.family]}"
        return {
            "spec": self.spec,
            "family": self.family,
            "source": self.source,
            "random": self.random,
            "label": label,
            "sample_rate": self.sample_rate,
            "frame_rate": self.frame_rate,
            "samples_per_frame": self.samples_per_frame,
            "codebook_size": self.codebook_size,
            "codebooks": self.n_codebooks,
            "semantic_codebooks": list(self.semantic_codebooks),
        }

    # --- encoding ----------------------------------------------------------------------------
    def whole_frames(self, n_samples: int) -> int:
        return n_samples // self.samples_per_frame

    @property
    def chunk_samples(self) -> int:
        """The most samples one encoder call sees: `encode_chunk_seconds` in whole frames (at least one)."""
        frames = max(1, self.whole_frames(int(self.encode_chunk_seconds * self.sample_rate)))
        return frames * self.samples_per_frame

    def encode(self, wave: np.ndarray) -> np.ndarray:
        return self.encode_batch([wave])[0]

    @torch.inference_mode()
    def encode_batch(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """Encode several waves at once: trim to whole frames, right-pad, encode, cut codes to true length.

        Waves longer than `chunk_samples` are encoded one at a time in chunks (`_encode_long`).
        """
        spf = self.samples_per_frame
        frames = [self.whole_frames(len(w)) for w in waves]
        if min(frames, default=1) < 1:
            raise ValueError("every wave must hold at least one whole codec frame")
        result: list = [None] * len(waves)
        short = []
        for i, (w, f) in enumerate(zip(waves, frames)):
            if f * spf > self.chunk_samples:
                result[i] = self._encode_long(np.ascontiguousarray(w[: f * spf], dtype=np.float32))
            else:
                short.append(i)
        if short:
            longest = max(frames[i] for i in short) * spf
            batch = np.zeros((len(short), 1, longest), dtype=np.float32)
            for row, i in enumerate(short):
                batch[row, 0, : frames[i] * spf] = waves[i][: frames[i] * spf]
            codes = self._encode(torch.from_numpy(batch).to(self.device))  # [B, K, F]
            codes = codes.to("cpu", torch.int64).numpy()
            for row, i in enumerate(short):
                result[i] = codes[row, :, : frames[i]].astype(np.int32)
        return result

    def _encode_long(self, wave: np.ndarray) -> np.ndarray:
        """Codes [K, F] of a whole-frame wave, from encoder calls of at most `chunk_samples` samples.

        For a codec whose transformers model keeps no streaming state (EnCodec's LSTM), each call
        re-encodes up to LEFT_CONTEXT_SECONDS (at most half a chunk) before its new samples and drops
        those codes: the codes equal one pass except where the lost older state tips a near-tie.
        """
        spf, chunk = self.samples_per_frame, self.chunk_samples
        context = min(self.whole_frames(int(LEFT_CONTEXT_SECONDS * self.sample_rate)), chunk // spf // 2) * spf
        out, start = [], 0
        while start < len(wave):
            lo = max(0, start - context)
            hi = min(len(wave), lo + chunk)
            codes = self._encode(torch.from_numpy(wave[None, None, lo:hi]).to(self.device))[0]
            out.append(codes[:, (start - lo) // spf:].to("cpu", torch.int64))
            start = hi
        return torch.cat(out, dim=1).numpy().astype(np.int32)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes [K, F] (K <= n_codebooks) -> float32 mono wave at `sample_rate`."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] < 1:
            raise ValueError(f"codes must be [n_codebooks, frames], got shape {codes.shape}")
        tensor = torch.as_tensor(codes, dtype=torch.long, device=self.device)[None]
        wave = self._decode(tensor)
        return wave.reshape(-1).float().cpu().numpy()

    def _encode(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MimiCodec(Codec):
    family = "mimi"

    def __init__(self, model, *args, **kwargs):
        self.max_codebooks = int(model.config.num_quantizers)
        self.samples_per_frame = int(round(model.config.sampling_rate / model.config.frame_rate))
        super().__init__(model, *args, **kwargs)

    @property
    def semantic_codebooks(self) -> tuple[int, ...]:
        n_sem = int(self.model.config.num_semantic_quantizers)
        return tuple(range(min(n_sem, self.n_codebooks)))

    def _encode(self, batch):
        return self.model.encode(batch, num_quantizers=self.n_codebooks).audio_codes

    def _encode_long(self, wave: np.ndarray) -> np.ndarray:
        """Exact chunking: each call continues Mimi's streaming state (the causal convolutions' padding
        cache and the encoder transformer's KV cache, kept to its sliding window), so the codes equal
        one-pass encoding and memory is bounded by the chunk length plus that window (10 s)."""
        encoder_cache = padding_cache = None
        out = []
        for lo in range(0, len(wave), self.chunk_samples):
            chunk = torch.from_numpy(wave[None, None, lo: lo + self.chunk_samples]).to(self.device)
            step = self.model.encode(chunk, num_quantizers=self.n_codebooks, encoder_cache=encoder_cache,
                                     padding_cache=padding_cache, use_streaming=True)
            encoder_cache, padding_cache = step.encoder_cache, step.padding_cache
            out.append(step.audio_codes[0].to("cpu", torch.int64))
        return torch.cat(out, dim=1).numpy().astype(np.int32)

    def _decode(self, codes):
        return self.model.decode(codes).audio_values


class EncodecCodec(Codec):
    family = "encodec"

    def __init__(self, model, *args, **kwargs):
        cfg = model.config
        self.samples_per_frame = int(np.prod(cfg.upsampling_ratios))
        self.bandwidths = sorted(float(b) for b in cfg.target_bandwidths)
        frame_rate = cfg.sampling_rate / self.samples_per_frame
        bits = math.log2(cfg.codebook_size)
        # EnCodec picks its number of codebooks from a bandwidth: n = bandwidth*1000 / (frame_rate*bits).
        self._n_for_bw = {bw: int(round(bw * 1000 / (frame_rate * bits))) for bw in self.bandwidths}
        self.max_codebooks = max(self._n_for_bw.values())
        super().__init__(model, *args, **kwargs)
        self.bandwidth = next((bw for bw in self.bandwidths if self._n_for_bw[bw] >= self.n_codebooks), None)

    def _encode(self, batch):
        out = self.model.encode(batch, bandwidth=self.bandwidth)
        return out.audio_codes[0, :, : self.n_codebooks]  # single chunk for the 24 kHz model

    def _decode(self, codes):
        return self.model.decode(codes[None], [None]).audio_values


FAMILIES = {"mimi": MimiCodec, "encodec": EncodecCodec}


def small_random_config(family: str):
    """A small config that encodes fast on CPU (tests, demo); same frame rates as the real codecs."""
    from transformers import EncodecConfig, MimiConfig

    if family == "mimi":
        return MimiConfig(
            hidden_size=128, num_filters=16, num_hidden_layers=2, intermediate_size=256,
            num_attention_heads=4, num_key_value_heads=4, head_dim=32, codebook_dim=64,
            vector_quantization_hidden_dimension=64, upsample_groups=128, num_quantizers=8,
        )
    return EncodecConfig(hidden_size=64, num_filters=8, codebook_dim=64, num_lstm_layers=1)


def full_random_config(family: str):
    """The real codec's shape (for throughput measurements without the weights)."""
    from transformers import EncodecConfig, MimiConfig

    return MimiConfig() if family == "mimi" else EncodecConfig()


def _probe_wave(sample_rate: int, seconds: float = 6.0, seed: int = RANDOM_SEED) -> torch.Tensor:
    """A deterministic, speech-like-ish signal (chirps, noise bursts, pauses) to spread random codebooks."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 120 + 80 * np.sin(2 * np.pi * 0.7 * t)
    voiced = sum(np.sin(2 * np.pi * h * np.cumsum(f0) / sample_rate) / h for h in range(1, 8))
    noise = rng.standard_normal(len(t))
    envelope = (np.sin(2 * np.pi * 1.5 * t) > -0.3).astype(float) * (0.2 + rng.random(len(t)) * 0.05)
    wave = 0.3 * (np.where(np.sin(2 * np.pi * 0.4 * t) > 0, voiced, noise * 0.5)) * envelope
    return torch.tensor(wave, dtype=torch.float32)[None, None]


def _codebooks(model):
    """The Euclidean codebooks of an RVQ model, in quantizer order (semantic first for Mimi)."""
    return [m for name, m in model.named_modules() if name.endswith(".codebook") and hasattr(m, "quantize")]


def _set_codebook(codebook, values: torch.Tensor) -> None:
    if hasattr(codebook, "embed_sum"):  # Mimi: embed = embed_sum / cluster_usage, cached in _embed
        codebook.embed_sum.copy_(values)
        codebook.cluster_usage.fill_(1.0)
        codebook._embed = None
    else:  # EnCodec
        codebook.embed.copy_(values)


@torch.inference_mode()
def randomize_codebooks(codec: Codec, seed: int = RANDOM_SEED) -> None:
    """Fill all-zero random-init codebooks with vectors drawn around real residuals.

    Codebook k is seeded from the residuals it sees on a probe signal once codebooks < k are set,
    so every stage produces codes that vary with the input (a zero codebook maps everything to 0).
    """
    gen = torch.Generator().manual_seed(seed)
    probe = _probe_wave(codec.sample_rate).to(codec.device)
    for codebook in _codebooks(codec.model):
        seen: list[torch.Tensor] = []
        original = codebook.quantize

        def capture(hidden, _orig=original):
            seen.append(hidden.reshape(-1, hidden.shape[-1]).float().cpu())
            return _orig(hidden)

        codebook.quantize = capture
        try:
            n_before = codec.n_codebooks
            codec.n_codebooks = codec.max_codebooks
            if isinstance(codec, EncodecCodec):
                codec.bandwidth = codec.bandwidths[-1]
            codec._encode(probe)
        finally:
            codec.n_codebooks = n_before
            if isinstance(codec, EncodecCodec):
                codec.bandwidth = next(bw for bw in codec.bandwidths if codec._n_for_bw[bw] >= n_before)
            del codebook.quantize
        residual = torch.cat(seen)
        size = codebook.embed_sum.shape[0] if hasattr(codebook, "embed_sum") else codebook.embed.shape[0]
        # Gaussian with the residual's per-dimension mean and spread: distinct, well-separated entries
        # (fewer near-ties than copies of probe frames) that still cover where real inputs fall.
        noise = torch.randn(size, residual.shape[1], generator=gen)
        values = residual.mean(0, keepdim=True) + noise * residual.std(0, keepdim=True)
        _set_codebook(codebook, values.to(codec.device))


def _hub_error(family: str, source: str, err: Exception) -> SodaError:
    reason = first_line(err, 200) or type(err).__name__
    return SodaError(
        f"could not load the {family} codec {source!r} ({reason}). Without hub access, download it "
        f"elsewhere (e.g. `hf download {source} --local-dir DIR`) and pass --codec {family}:DIR, "
        f"or pass --codec {family}:random for a random-weight offline test codec"
    )


def _family_of_directory(path: Path) -> str:
    import json

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SodaError(f"codec directory {path} has no config.json")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type", "")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SodaError(f"codec directory {path}: config.json is not valid JSON ({err})") from None
    if model_type not in FAMILIES:
        raise SodaError(f"codec directory {path}: model_type {model_type!r} is not a supported codec (mimi, encodec)")
    return model_type


def parse_codec_spec(spec: str) -> tuple[str, str]:
    """'mimi' -> ('mimi', 'kyutai/mimi'); 'mimi:random' -> ('mimi', 'random'); a directory -> (family, dir)."""
    if spec in FAMILIES:
        return spec, HUB_DEFAULTS[spec]
    family, sep, rest = spec.partition(":")
    if sep and family in FAMILIES and rest:
        return family, rest
    if Path(spec).is_dir():
        return _family_of_directory(Path(spec)), spec
    raise SodaError(f"unknown codec {spec!r}; choose {CODEC_CHOICES}")


def load_codec(spec: str = "mimi", codebooks: int = 8, device: str = "auto",
               encode_chunk_seconds: float = DEFAULT_ENCODE_CHUNK_SECONDS) -> Codec:
    """Build a codec from a spec: `mimi`, `encodec`, `mimi:random[-full]`, `FAMILY:DIR_OR_HUB_ID`, or a directory."""
    family, source = parse_codec_spec(spec)
    dev = resolve_device(device)
    cls = FAMILIES[family]
    if source in ("random", "random-full"):
        from transformers import EncodecModel, MimiModel

        config = small_random_config(family) if source == "random" else full_random_config(family)
        torch.manual_seed(RANDOM_SEED)
        model = (MimiModel if family == "mimi" else EncodecModel)(config)
        # Codebooks are randomised on CPU so the codec is identical whatever the device.
        codec = cls(model, spec, source, codebooks, torch.device("cpu"), random=True,
                    encode_chunk_seconds=encode_chunk_seconds)
        randomize_codebooks(codec)
        codec.model.to(dev)
        codec.device = dev
        return codec
    from transformers import EncodecModel, MimiModel

    model_cls = MimiModel if family == "mimi" else EncodecModel
    path = Path(source).expanduser()
    if path.is_dir():
        if family != _family_of_directory(path):
            raise SodaError(f"codec directory {path} holds a {_family_of_directory(path)} model, not {family}")
        source = str(path)
    elif source.startswith((".", "/", "~")) or os.sep in source and not _looks_like_hub_id(source):
        raise SodaError(f"codec directory {source} does not exist")
    try:
        model = model_cls.from_pretrained(source)
    except Exception as err:  # hub/network/format problems become one clear line
        raise _hub_error(family, source, err) from None
    return cls(model, spec, source, codebooks, dev, random=False, encode_chunk_seconds=encode_chunk_seconds)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts)
