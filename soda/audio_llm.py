"""A second model family: Falcon3-Audio's "text-first" design, so it can be trained on the same data as SODA.

Frozen Whisper encoder -> 2x temporal pooling -> linear projector -> LoRA'd instruction-tuned text LLM
(Falcon3-Audio, arXiv 2509.07526; the Qwen2-Audio pattern). Audio enters as 16 kHz log-mel features, not codec
tokens; the instruction items are the manifests `soda-finetune instruct` reads (`instruct_data.read_items`).

What is known and what is chosen (see shared/reference/audio-qa-seeds-notes.md §2.2-2.3):

* 750 audio embeddings per 30 s clip: Whisper emits 1,500 frames per 30 s (50 Hz), pooled 2x to 25 Hz. Whether
  Falcon3-Audio stacks adjacent frames or averages them is not published: `pooling="stack"` (concatenate 2 frames,
  the projector sees 2x the encoder width) is the default, `"mean"` is Qwen2-Audio's AvgPool1d(2, 2).
* Whisper always encodes a 30 s window (shorter clips are padded, longer ones cut at 30 s, as Whisper and
  Qwen2-Audio do). `trim=True` (default) keeps only the clip's own pooled frames: Qwen2-Audio's processor expands
  its audio token to `((mel - 1) // 2 + 1 - 2) // 2 + 1` positions (checked in transformers 5.x), i.e. 750 for a
  full 30 s clip and 50 for a 2 s one; `trim=False` keeps all 750 for every clip (the padding is silence).
* The encoder is frozen and stays in eval mode; only the projector and the LoRA adapters train (rank 8, alpha 16
  on q/k/v/o are the defaults: the authors' WavLink sweep used rank 8; Falcon3-Audio's own values are unknown).
* The audio placeholder (`<|audio|>`) is added to the LLM tokenizer when absent; the LLM's embeddings are *not*
  resized: placeholder positions are looked up as id 0 and overwritten, so the merged LLM is a plain LLM.

Export layout (`save_pretrained`): `adapter/` (peft LoRA), `projector.safetensors`, `tokenizer/`, and
`audio_llm.json` naming the encoder and LLM. `merge` writes `llm/` (LoRA merged in) instead of `adapter/`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tokenize_audio.errors import SodaError, first_line

SAMPLE_RATE = 16000  # Whisper's feature extractor
CONFIG_FILE = "audio_llm.json"
FORMAT = "soda-encoder-projector"
POOLINGS = ("stack", "mean")
IGNORE = -100


@dataclass
class EncoderProjectorConfig:
    """Everything that rebuilds the model from its parts; written as `audio_llm.json` beside the weights."""

    encoder: str = "openai/whisper-medium"
    """Whisper model (hub id or local directory) whose encoder and feature extractor are used, frozen."""
    llm: str = "tiiuae/Falcon3-1B-Instruct"
    """Causal LM (hub id or local directory) with a chat template; LoRA'd."""
    pooling: str = "stack"
    """`stack` (concatenate adjacent frames) or `mean` (average them); Falcon3-Audio's choice is unpublished."""
    pool: int = 2
    """Frames pooled into one embedding: 2 gives 1,500 -> 750 per 30 s (25 Hz), Falcon3-Audio's count."""
    trim: bool = True
    """Keep only the clip's own pooled frames (Qwen2-Audio), not the 30 s window's padding."""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    audio_token: str = "<|audio|>"
    """Placeholder in the user turn; replaced by the clip's projected embeddings."""

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise SodaError(f"pooling {self.pooling!r}: choose {' or '.join(POOLINGS)}")
        if self.pool < 1:
            raise SodaError(f"pool {self.pool}: must be at least 1")
        self.lora_targets = list(self.lora_targets)

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> EncoderProjectorConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _source(name: str, role: str) -> str:
    """A local directory if there is one, else the hub id; a missing path is one clear line, not a hub lookup."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if name.startswith((".", "/", "~")) or len(name.split("/")) != 2:
        raise SodaError(f"--{role} {name}: no such directory (and not a hub id OWNER/NAME)")
    return name


def _load(role: str, name: str, loader, **kwargs):
    try:
        return loader(_source(name, role), **kwargs)
    except SodaError:
        raise
    except Exception as err:
        raise SodaError(f"--{role} {name}: cannot load ({first_line(err, 200) or type(err).__name__}); without hub "
                        f"access, download it elsewhere (`hf download {name} --local-dir DIR`) and pass DIR") from None


def load_encoder(name: str):
    """(WhisperEncoder, WhisperFeatureExtractor) of a Whisper checkpoint; the decoder is dropped."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    whisper = _load("encoder", name, WhisperModel.from_pretrained, dtype=torch.float32)
    features = _load("encoder", name, WhisperFeatureExtractor.from_pretrained)
    encoder = whisper.get_encoder()
    if features.feature_size != encoder.config.num_mel_bins:
        raise SodaError(f"--encoder {name}: its feature extractor makes {features.feature_size} mel bins but the "
                        f"encoder takes {encoder.config.num_mel_bins}")
    return encoder, features


def load_tokenizer(name: str, audio_token: str):
    """The LLM's tokenizer with the audio placeholder as a special token (added when absent) and a pad id."""
    from transformers import AutoTokenizer

    tok = _load("llm", name, AutoTokenizer.from_pretrained)
    if not getattr(tok, "chat_template", None):
        raise SodaError(f"--llm {name}: its tokenizer has no chat template (use an instruction-tuned model)")
    if audio_token not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [audio_token]}, replace_extra_special_tokens=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


class EncoderProjectorModel(nn.Module):
    """Frozen Whisper encoder + pooling + linear projector + LoRA'd causal LM.

    `adapter`: a saved peft adapter directory to load (else fresh LoRA from the config); `lora=False` uses the LLM
    as it is (a merged export); `tokenizer`: where the tokenizer is (default: the LLM's). Only the projector and
    LoRA parameters require gradients.
    """

    def __init__(self, config: EncoderProjectorConfig, adapter: Path | None = None, lora: bool = True,
                 trainable: bool = True, tokenizer: str | None = None):
        super().__init__()
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM

        self.config = config
        self.encoder, self.feature_extractor = load_encoder(config.encoder)
        self.encoder.requires_grad_(False)
        self.tokenizer = load_tokenizer(tokenizer or config.llm, config.audio_token)
        self.audio_token_id = self.tokenizer.convert_tokens_to_ids(config.audio_token)
        llm = _load("llm", config.llm, AutoModelForCausalLM.from_pretrained, dtype=torch.float32)
        width = self.encoder.config.d_model * (config.pool if config.pooling == "stack" else 1)
        self.projector = nn.Linear(width, llm.config.hidden_size)
        if adapter is not None:
            self.llm = PeftModel.from_pretrained(llm, str(adapter), is_trainable=trainable)
        elif lora:
            lora_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                     target_modules=list(config.lora_targets), task_type="CAUSAL_LM")
            try:
                self.llm = get_peft_model(llm, lora_config)
            except ValueError as err:  # peft: "Target modules {...} not found in the base model"
                raise SodaError(f"--lora-targets {','.join(config.lora_targets)}: {first_line(err, 200)} (the "
                                f"LLM's linear layers are named e.g. q_proj, k_proj, v_proj, o_proj)") from None
        else:
            self.llm = llm.requires_grad_(False)
        self.projector.requires_grad_(trainable)
        self.train(trainable)

    def train(self, mode: bool = True):
        """The encoder stays in eval mode: it is frozen, and its dropout/LayerDrop must not run."""
        super().train(mode)
        self.encoder.eval()
        return self

    def parameter_counts(self) -> dict:
        """Trainable (projector + LoRA) and total parameters, for reports beside the native model's."""
        params = list(self.parameters())
        return {"trainable": sum(p.numel() for p in params if p.requires_grad),
                "total": sum(p.numel() for p in params)}

    @torch.no_grad()
    def encode(self, input_features: torch.Tensor) -> torch.Tensor:
        """(B, mels, 3000) log-mel -> (B, 1500, encoder width): the frozen encoder's states. They depend on the clip
        only, so a clip asked about many times (Open-ASQA) can be encoded once and passed as `encoder_states`."""
        return self.encoder(input_features.to(self.encoder.conv1.weight.dtype)).last_hidden_state

    def trainable_state_dict(self) -> dict:
        """Only what training changes (projector + LoRA): what a training checkpoint must hold beside the config."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_trainable_state(self, state: dict) -> None:
        """Put back `trainable_state_dict()`; the frozen weights come from the encoder and LLM the config names."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        if set(state) != names:
            odd = sorted(set(state) ^ names)
            raise SodaError(f"the checkpoint's trainable tensors differ from this model's ({len(odd)}, e.g. "
                            f"{odd[0]}); were the LoRA settings changed?")
        self.load_state_dict(state, strict=False)

    def audio_embeddings(self, input_features=None, encoder_states=None) -> torch.Tensor:
        """Log-mel features (or their encoder states) -> (B, 1500 // pool, llm width): pool adjacent frames, project."""
        frames = self.encode(input_features) if encoder_states is None else encoder_states
        frames = frames.to(self.projector.weight.dtype)
        b, t, d = frames.shape
        frames = frames[:, : t - t % self.config.pool].reshape(b, t // self.config.pool, self.config.pool, d)
        pooled = frames.reshape(b, t // self.config.pool, -1) if self.config.pooling == "stack" else frames.mean(2)
        return self.projector(pooled)

    def input_embeddings(self, input_ids, input_features, audio_lengths, encoder_states=None) -> torch.Tensor:
        """The LLM's input embeddings with row i's placeholder positions replaced by its first audio_lengths[i]
        projected embeddings, in order (the collate expanded the one placeholder to exactly that many)."""
        audio = self.audio_embeddings(input_features, encoder_states)
        is_audio = input_ids == self.audio_token_id
        counts = is_audio.sum(1)
        if not torch.equal(counts.cpu(), audio_lengths.cpu()):
            raise SodaError(f"audio placeholders per row {counts.tolist()} differ from the clips' embedding counts "
                            f"{audio_lengths.tolist()}; build batches with `Collate`")
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_audio, 0))
        keep = torch.arange(audio.shape[1], device=audio.device)[None, :] < audio_lengths.to(audio.device)[:, None]
        return embeds.masked_scatter(is_audio[..., None], audio[keep].to(embeds.dtype))

    def forward(self, input_ids, attention_mask, audio_lengths, input_features=None, labels=None,
                encoder_states=None, **_):
        """The LLM's output (logits; loss when labels are given: mean cross-entropy over the response tokens).
        `encoder_states` (from `encode`) stand in for `input_features`."""
        embeds = self.input_embeddings(input_ids, input_features, audio_lengths, encoder_states)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def response_log_probs(self, items, waves=None) -> list[np.ndarray]:
        """Per-token log-probs of each item's response (the labelled tokens: the response and the template's
        end of turn), given its audio and instruction: what likelihood scoring of answer options needs."""
        batch = Collate(self.tokenizer, self.feature_extractor, self.config)(items, waves=waves)
        device = self.projector.weight.device
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = self(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        picked = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return [row[lab != IGNORE].cpu().numpy() for row, lab in zip(picked, labels)]

    @torch.no_grad()
    def generate(self, items, max_new_tokens: int = 32, waves=None, endings: bool = False) -> list:
        """Greedy answers to instruction items (their responses are ignored), batched with left padding.
        `endings=True`: (answer, why it stopped) pairs, "text_end" (an end-of-turn id) or "max_tokens"."""
        batch = Collate(self.tokenizer, self.feature_extractor, self.config)(items, waves=waves, with_response=False)
        device = self.projector.weight.device
        embeds = self.input_embeddings(batch["input_ids"].to(device), batch["input_features"].to(device),
                                       batch["audio_lengths"])
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(device),
                                max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=self.tokenizer.pad_token_id)
        texts = [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]
        if not endings:
            return texts
        stops = self.llm.generation_config.eos_token_id
        stops = torch.tensor(sorted({self.tokenizer.eos_token_id, *(stops if isinstance(stops, list) else [stops])}
                                    - {None}), device=out.device)
        return [(t, "text_end" if torch.isin(row, stops).any() else "max_tokens") for t, row in zip(texts, out)]

    def save_pretrained(self, out: Path, trainable: dict | None = None) -> Path:
        """Write adapter/ (or llm/ when there is no LoRA), projector.safetensors, tokenizer/ and audio_llm.json.
        `trainable`: the projector and LoRA tensors to write instead of this model's own (`trainable_state_dict`'s
        names; whole tensors gathered from an FSDP-sharded model)."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        adapter = None if trainable is None else {k.removeprefix("llm."): v for k, v in trainable.items()
                                                  if k.startswith("llm.")}
        self.llm.save_pretrained(str(out / ("adapter" if self._has_lora() else "llm")), state_dict=adapter)
        projector = self.projector.state_dict() if trainable is None else {
            k.removeprefix("projector."): v for k, v in trainable.items() if k.startswith("projector.")}
        save_file({k: v.detach().contiguous().cpu() for k, v in projector.items()}, str(out / "projector.safetensors"))
        self.tokenizer.save_pretrained(str(out / "tokenizer"))
        config = self.config.to_json()
        for role in ("encoder", "llm"):  # a local directory by its absolute path: the export may be read elsewhere
            if Path(config[role]).expanduser().is_dir():
                config[role] = str(Path(config[role]).expanduser().resolve())
        if not self._has_lora():
            config["llm"] = "llm"  # relative to the export: the LLM's weights are in it
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        return out

    def _has_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.llm, PeftModel)


def read_config(path: Path) -> EncoderProjectorConfig:
    """The export's audio_llm.json; a relative `llm` (a merged export) resolves inside it."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise SodaError(f"{path}: not an encoder-projector export (no {CONFIG_FILE})")
    data = json.loads(file.read_text())
    if data.get("format") != FORMAT:
        raise SodaError(f"{file}: format {data.get('format')!r} is not {FORMAT}")
    config = EncoderProjectorConfig.from_json(data)
    if (Path(path) / config.llm).is_dir() and not Path(config.llm).is_absolute():
        config.llm = str(Path(path) / config.llm)
    return config


def load(path: Path, trainable: bool = False) -> EncoderProjectorModel:
    """Rebuild a saved or merged export: the same encoder and LLM, its adapter and projector; the same logits."""
    from safetensors.torch import load_file

    path = Path(path)
    config = read_config(path)
    adapter = path / "adapter"
    model = EncoderProjectorModel(config, adapter=adapter if adapter.is_dir() else None, lora=False,
                                  trainable=trainable, tokenizer=str(path / "tokenizer"))
    model.projector.load_state_dict(load_file(str(path / "projector.safetensors")))
    return model


EXPORT_DIR = "hf"  # a run's export, as soda-train's


def export_of(source) -> Path | None:
    """The encoder-projector export a CHECKPOINT argument names (the directory, or a run's RUN/hf), else None."""
    path = Path(str(source)).expanduser()
    for candidate in (path, path / EXPORT_DIR):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    return None


def read_trainable(ckpt: dict, path) -> tuple[EncoderProjectorConfig, dict]:
    """(config, trainable tensors) of a training checkpoint of this family (what `trainable_state_dict` saved)."""
    meta = ckpt.get("soda") or {}
    if meta.get("family") != FORMAT:
        raise SodaError(f"{path}: not an encoder-projector checkpoint")
    prefix = "model."  # the Lightning module holds the model as `model`
    return (EncoderProjectorConfig.from_json(meta["config"]),
            {k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items()})


def merge(path: Path, out: Path) -> Path:
    """Merge an export's LoRA into the LLM weights (peft `merge_and_unload`): out/llm/ is a plain transformers LLM
    directory (with the tokenizer), beside the projector and a config that names it."""
    model = load(path)
    if not model._has_lora():
        raise SodaError(f"{path}: already merged (no adapter/)")
    model.llm = model.llm.merge_and_unload()
    model.save_pretrained(out)
    model.tokenizer.save_pretrained(str(Path(out) / "llm"))
    return Path(out)


class Collate:
    """Instruction items (`instruct_data.InstructItem` or dicts with audio, instruction, response) -> a batch.

    The user turn is `<|audio|>\\ninstruction` and the assistant turn the response, through the LLM tokenizer's
    own chat template; the one placeholder is expanded to the clip's embedding count. Labels are -100 except on
    the response (and what the template closes the assistant turn with, e.g. its end-of-turn token).
    """

    def __init__(self, tokenizer, feature_extractor, config: EncoderProjectorConfig):
        self.tokenizer, self.features, self.config = tokenizer, feature_extractor, config
        self.audio_token_id = tokenizer.convert_tokens_to_ids(config.audio_token)

    def audio_length(self, mel_frames: int) -> int:
        """Pooled embeddings kept for a clip of `mel_frames` valid log-mel frames (Whisper's conv stride 2)."""
        frames = self.features.nb_max_frames // 2
        if self.config.trim:
            frames = (mel_frames - 1) // 2 + 1
        return max(1, frames // self.config.pool)

    def prompt_ids(self, instruction: str, response: str | None = None) -> tuple[list[int], list[int]]:
        """(prompt ids ending with the assistant header, response ids) through the chat template."""
        user = [{"role": "user", "content": f"{self.config.audio_token}\n{instruction}"}]
        prompt = self.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if ids.count(self.audio_token_id) != 1:
            raise SodaError(f"the chat template's user turn holds {ids.count(self.audio_token_id)} audio "
                            f"placeholders {self.config.audio_token!r}, not 1")
        if response is None:
            return ids, []
        full = self.tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prompt):
            raise SodaError("the LLM's chat template does not render the prompt as a prefix of the conversation; "
                            "cannot tell the response's tokens apart")
        return ids, self.tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]

    def waves(self, items) -> list[np.ndarray]:
        from tokenize_audio.audio import load_audio

        return [load_audio(_get(it, "audio"), SAMPLE_RATE) for it in items]

    def __call__(self, items, waves=None, with_response: bool = True) -> dict:
        waves = self.waves(items) if waves is None else waves
        feats = log_mel(self.features, waves)
        lengths = [self.audio_length(int(n)) for n in feats["attention_mask"].sum(1)]
        rows = []
        for it, n in zip(items, lengths):
            prompt, response = self.prompt_ids(_get(it, "instruction"),
                                               _get(it, "response") if with_response else None)
            at = prompt.index(self.audio_token_id)
            ids = prompt[:at] + [self.audio_token_id] * n + prompt[at + 1:] + response
            rows.append((ids, [IGNORE] * (len(ids) - len(response)) + response))
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        left = not with_response  # generation continues after the prompt: pad on the left
        def padded(seq, value):
            fill = [value] * (width - len(seq))
            return fill + seq if left else seq + fill
        return {"input_ids": torch.tensor([padded(ids, pad) for ids, _ in rows]),
                "attention_mask": torch.tensor([padded([1] * len(ids), 0) for ids, _ in rows]),
                "labels": torch.tensor([padded(lab, IGNORE) for _, lab in rows]),
                "input_features": feats["input_features"],
                "audio_lengths": torch.tensor(lengths)}


def log_mel(extractor, waves: list[np.ndarray]) -> dict:
    """Whisper's log-mel features of a batch ({input_features (B, mels, 3000), attention_mask (B, 3000)}), as its
    feature extractor computes them, without the STFT of the padding: frames that see only the zeros after the
    longest clip are all alike (log10 of the floor 1e-10, then the clamp to the clip's max - 8), so only the frames
    up to there are computed and the rest filled in. Short clips (a 2 s one is 1/15 of the window) cost that much
    less. Other extractors, or settings this does not follow (dither, normalisation), go through the extractor."""
    from transformers import WhisperFeatureExtractor

    plain = (type(extractor) is WhisperFeatureExtractor and not extractor.dither and not
             getattr(extractor, "do_normalize", False) and extractor.n_samples % extractor.hop_length == 0)
    if not plain:
        return extractor(waves, sampling_rate=SAMPLE_RATE, return_attention_mask=True, return_tensors="pt")
    n_fft, hop, total = extractor.n_fft, extractor.hop_length, extractor.n_samples
    frames = total // hop  # the extractor drops the STFT's last frame
    sizes = [min(len(w), total) for w in waves]
    # frame t sees samples [t*hop - n_fft/2, t*hop + n_fft/2): from `computed` on, only zeros
    computed = min(frames, -(-(max(sizes) + n_fft // 2) // hop) + 1)
    span = min(total, computed * hop + n_fft)  # enough zeros after the clips for the centred frames' reflection
    batch = np.zeros((len(waves), span), dtype=np.float32)
    for row, (w, n) in enumerate(zip(waves, sizes)):
        batch[row, :min(n, span)] = w[:min(n, span)]
    wave = torch.from_numpy(batch)
    stft = torch.stft(wave, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True)[..., :computed]
    magnitudes = (stft.abs() ** 2).contiguous()
    mel = torch.from_numpy(extractor.mel_filters).to(torch.float32).T @ magnitudes
    log_spec = torch.clamp(mel, min=1e-10).log10()
    silent = torch.tensor(-10.0)  # log10(1e-10): the padding's frames
    peak = torch.maximum(log_spec.amax(dim=(1, 2)), silent)[:, None, None] if computed < frames else \
        log_spec.amax(dim=(1, 2))[:, None, None]
    full = torch.full((len(waves), log_spec.shape[1], frames), -10.0)
    full[..., :computed] = log_spec
    features = (torch.maximum(full, peak - 8.0) + 4.0) / 4.0
    mask = torch.zeros((len(waves), frames), dtype=torch.int32)
    for row, n in enumerate(sizes):
        mask[row, :-(-n // hop)] = 1  # the extractor's attention mask: samples [::hop]
    return {"input_features": features, "attention_mask": mask}


def _get(item, name: str):
    return item[name] if isinstance(item, dict) else getattr(item, name)


# --------------------------------------------------------------------------------------------
# Random parts, for offline tests and pipeline demonstrations (no downloads)
# --------------------------------------------------------------------------------------------
RANDOM_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def random_parts(out: Path, whisper_width: int = 32, whisper_layers: int = 1, llm_width: int = 32,
                 llm_layers: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """RANDOM-weight local stand-ins for `--encoder` and `--llm` (out/whisper-random, out/llm-random): a Whisper
    encoder with its feature extractor, and a Llama with a byte tokenizer and a ChatML template. They exercise every
    step of the pipeline offline; what they learn says nothing about real encoders and LLMs."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperModel,
    )

    from tokenize_audio.vocab import byte_tokenizer

    out = Path(out)
    torch.manual_seed(seed)
    heads = max(2, whisper_width // 16)
    whisper = WhisperModel(WhisperConfig(
        d_model=whisper_width, encoder_layers=whisper_layers, decoder_layers=1, encoder_attention_heads=heads,
        decoder_attention_heads=heads, encoder_ffn_dim=2 * whisper_width, decoder_ffn_dim=2 * whisper_width,
        num_mel_bins=80, max_source_positions=1500, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=1,
        decoder_start_token_id=1))
    # At std 0.02 the convolutions' output is ~0.3% of the positional table's, so clips are indistinguishable after
    # the encoder; a trained encoder's features follow the audio.
    for conv in (whisper.encoder.conv1, whisper.encoder.conv2):
        nn.init.normal_(conv.weight, std=0.3)
    whisper.save_pretrained(out / "whisper-random")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out / "whisper-random")
    raw = byte_tokenizer()
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = RANDOM_CHAT_TEMPLATE
    tok.save_pretrained(out / "llm-random")
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=llm_width, intermediate_size=2 * llm_width, num_hidden_layers=llm_layers,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False))
    # A pretrained head separates tokens; a random one at std 0.02 caps the logits near +-0.6 (with its final norm
    # frozen), so no adapter could fit anything: widen it, as training would have.
    nn.init.normal_(llm.lm_head.weight, std=0.3)
    llm.save_pretrained(out / "llm-random")
    return out / "whisper-random", out / "llm-random"
