"""The hierarchical model family: a Qwen3 backbone over *steps* and a small depth decoder over each frame's codebooks.

A step is one text or special token, or one whole audio frame (K codebook codes). The backbone reads a frame as the
sum of its K codebook embeddings and, from step t, predicts step t+1's *primary* token through one unified head:
text, specials and codebook 0 (semantic). When step t+1 is a frame, a depth decoder of its own (half the width,
4 layers by default: `soda.shape.HierarchicalShape`) runs over that frame alone, at positions

    [proj(h_t), emb(cb0), emb(cb1), ..., emb(cb_{K-2})]

and its outputs at positions 1..K-1 predict cb1..cb_{K-1} through K-1 separate codebook_size-way heads, teacher-forced
(the CSM / Moshi factorisation; SODA-Hier in the follow-up study). Frames are independent sequences of length K to
the depth decoder, so a frame's depth pass sees the backbone's past and its own earlier codebooks, nothing else.

Ids. Steps hold *flat* ids, the same ids the flattened model reads (`tokenize_audio.vocab`): a text/special step is
`[id, PAD, ..., PAD]`, a frame step its K audio ids in codebook order. The unified head's output index equals the flat
id for text, specials and codebook 0 (codebook 0's ids follow the specials directly), so the unified vocabulary is
the flat vocabulary's first `audio_base + codebook_size` ids (130,308 with SODA's) and no id mapping is needed; the
depth head for codebook k predicts the code `id - audio_base - k * codebook_size`.

Windows. Training windows are `seq_len` steps (`soda.train.data.StepReader` reads them from the same shards;
`soda.train.index.index_steps` counts each document's steps once). `regroup` turns flat ids into steps and keeps
only whole frames: a frame is K consecutive ids of codebooks 0..K-1 in order, inside one document; any audio id
that is not part of one (a frame cut short, or flat ids cut mid-frame by an evaluation's own batching) is dropped
and counted, never guessed. `flatten` is the inverse on what is kept.

Loss. Every scored target has a kind: text, special, or codebook k (the groups of `Vocabulary.nll_groups()`, so the
flattened family's logs compare). The training loss is `sum_i w_i (nll_i + z * lse_i^2) / sum_i w_i` over the
scored targets (one per step transition, plus K-1 acoustic ones per frame target), with w the per-kind weight of
`--loss-weights`; the NLL vector (per-kind sums and counts) is always unweighted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from soda.loss_weights import LOSS_WEIGHTS, loss_weights
from soda.shape import HierarchicalShape, ModelShape


PAD = -1  # an empty codebook slot (slots 1.. of a text/special step); a padding step is PAD in every slot
ORIGINAL_CONTEXT = 8192  # Llama-3.1 RoPE scaling, as soda.model.qwen3_config
CHUNK_ELEMENTS = 2**27  # logits per chunk of the loss (as soda.train.loss): rows = this // head size


# --------------------------------------------------------------------------------------------
# Flat ids <-> steps
# --------------------------------------------------------------------------------------------
@dataclass
class Steps:
    """One window as steps. `codes` [S, K]: flat ids, a text/special step `[id, PAD, ...]`, a frame its K audio ids;
    `doc_ids` [S]: the document of each step; `starts` [S]: where each step begins in the flat window;
    `loss_mask` [S] (or None): the flat loss mask at each step's first id; `dropped`: audio ids left out (partial
    frames)."""

    codes: np.ndarray
    doc_ids: np.ndarray
    starts: np.ndarray
    loss_mask: np.ndarray | None = None
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.codes)


def regroup(ids, vocab, doc_ids=None, loss_mask=None) -> Steps:
    """Flat ids of one window (several documents, possibly cut mid-frame at either end) -> `Steps`.

    Exact: every text/special id becomes one step, every whole frame (K consecutive ids of codebooks 0..K-1 in
    order, one document) one step, in window order; an audio id outside a whole frame is dropped and counted.
    `doc_ids` defaults to one document; positions restart per document (`step_positions`)."""
    ids = np.asarray(ids, dtype=np.int64)
    n, k = len(ids), vocab.n_codebooks
    if n and (ids.min() < 0 or ids.max() >= vocab.size):
        raise ValueError(f"ids outside the vocabulary (0..{vocab.size - 1})")
    doc = np.zeros(n, np.int64) if doc_ids is None else np.asarray(doc_ids, dtype=np.int64)
    cb = vocab.codebook_of(ids)
    fill = (doc.min() - 1) if n else -1
    windows_cb = np.lib.stride_tricks.sliding_window_view(np.concatenate([cb, np.full(k - 1, -1)]), k)
    windows_doc = np.lib.stride_tricks.sliding_window_view(np.concatenate([doc, np.full(k - 1, fill)]), k)
    frame = (windows_cb == np.arange(k)).all(1) & (windows_doc == doc[:, None]).all(1)
    starts = np.flatnonzero((cb < 0) | frame)
    codes = np.full((len(starts), k), PAD, np.int64)
    codes[:, 0] = ids[starts]
    is_frame = frame[starts]
    codes[is_frame] = ids[starts[is_frame][:, None] + np.arange(k)]
    dropped = int((cb >= 0).sum() - is_frame.sum() * k)
    mask = None if loss_mask is None else np.asarray(loss_mask, dtype=bool)[starts]
    return Steps(codes, doc[starts], starts, mask, dropped)


def flatten(codes) -> np.ndarray:
    """Steps' codes [S, K] (or [..., K]) -> the flat ids, in order: the inverse of `regroup` on whole frames."""
    codes = np.asarray(codes)
    return codes[codes != PAD]


def regroup_batch(batch: dict, vocab, n_steps: int | None = None, multiple: int = 1) -> dict:
    """A flat batch `{"input_ids": [B, L], "doc_ids": [B, L], ("loss_mask")}` -> a step batch `{"codes": [B, S, K],
    "doc_ids": [B, S], ("loss_mask": [B, S])}`, each window's steps padded at the end to S (`n_steps`, default the
    longest rounded up to a `multiple`, at most L) with padding steps (codes PAD, document -1). A window with more
    than `n_steps` steps is an error."""
    ids, docs = batch["input_ids"].cpu().numpy(), batch["doc_ids"].cpu().numpy()
    masks = batch["loss_mask"].cpu().numpy() if "loss_mask" in batch else [None] * len(ids)
    rows = [regroup(i, vocab, d, m) for i, d, m in zip(ids, docs, masks)]
    longest = max((len(r) for r in rows), default=0)
    s = min(-(-longest // multiple) * multiple, ids.shape[1]) if n_steps is None else n_steps
    if longest > s:
        raise ValueError(f"a window holds {longest} steps, more than {s}")
    codes = np.full((len(rows), s, vocab.n_codebooks), PAD, np.int64)
    doc = np.full((len(rows), s), -1, np.int64)
    mask = np.zeros((len(rows), s), bool)
    for b, r in enumerate(rows):
        codes[b, :len(r)], doc[b, :len(r)] = r.codes, r.doc_ids
        mask[b, :len(r)] = True if r.loss_mask is None else r.loss_mask
    out = {"codes": torch.from_numpy(codes), "doc_ids": torch.from_numpy(doc)}
    if "loss_mask" in batch:
        out["loss_mask"] = torch.from_numpy(mask)
    return out


# --------------------------------------------------------------------------------------------
# Masks and positions over steps (the rules of soda.model's document_mask / position_ids)
# --------------------------------------------------------------------------------------------
def step_mask(doc_ids: torch.Tensor, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, S] step document ids -> [B, 1, S, S]: causal and block-diagonal by document (True = attend), or additive
    (0 / dtype min) for eager attention."""
    s = doc_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    allowed = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]
    if additive_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=additive_dtype, device=doc_ids.device).masked_fill_(
        ~allowed, torch.finfo(additive_dtype).min)


def step_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at every document's first step in the window."""
    b, s = doc_ids.shape
    idx = torch.arange(s, device=doc_ids.device).expand(b, s)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HierarchicalConfig:
    """A hierarchical model: its sizes (`shape`), the vocabulary ids it needs to tell kinds apart, the loss weights
    and the attention kernel. `from_vocab` fills the ids from a `Vocabulary`."""

    shape: HierarchicalShape
    text_size: int  # text ids come first; the four specials follow, then audio
    bos_id: int
    eos_id: int
    loss_weights: str = "uniform"
    attention: str = "sdpa"  # or "eager"
    rope_theta: float = 500_000.0
    rope_factor: float = 8.0
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.loss_weights not in LOSS_WEIGHTS:
            raise ValueError(f"unknown loss weights {self.loss_weights!r}; choose from {LOSS_WEIGHTS}")
        if self.text_size + 4 != self.shape.audio_base:
            raise ValueError(f"text ids ({self.text_size}) + 4 specials do not end at the shape's audio base "
                             f"({self.shape.audio_base})")

    @classmethod
    def from_vocab(cls, backbone: ModelShape, vocab, **kwargs) -> HierarchicalConfig:
        """`backbone`'s vocabulary is replaced by `vocab`'s; `kwargs` go to HierarchicalShape (depth_width,
        depth_layers, ...) or to this config (loss_weights, attention, ...)."""
        if tuple(vocab.semantic_codebooks) != (0,):
            raise ValueError("the hierarchical family needs codebook 0 (and only it) to be the semantic codebook")
        shape_keys = {"depth_width", "depth_layers", "depth_heads", "depth_ffn"}
        shape = HierarchicalShape(replace(backbone, vocab=vocab.size), vocab.n_codebooks, vocab.codebook_size,
                                  **{k: v for k, v in kwargs.items() if k in shape_keys})
        return cls(shape, vocab.text_size, vocab.bos_id, vocab.eos_id,
                   **{k: v for k, v in kwargs.items() if k not in shape_keys})

    @property
    def groups(self) -> list[str]:
        """The NLL vector's groups, as `Vocabulary.nll_groups()` names them with one semantic codebook."""
        return ["text", "special", "semantic"] + [f"acoustic_cb{k}" for k in range(1, self.shape.n_codebooks)]


def _qwen3(shape: ModelShape, config: HierarchicalConfig, positions: int, bos_eos: bool):
    """A transformers Qwen3Config with soda.model.qwen3_config's settings (RMSNorm eps 1e-5, QK-norm, untied, no
    biases, Llama-3.1 RoPE), for a stack fed `inputs_embeds`; no padding row in its table."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=shape.vocab, hidden_size=shape.width, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        intermediate_size=shape.ffn, max_position_embeddings=max(positions, ORIGINAL_CONTEXT) * int(max(config.rope_factor, 1)),
        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": config.rope_theta, "factor": config.rope_factor,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": ORIGINAL_CONTEXT},
        bos_token_id=config.bos_id if bos_eos else None, eos_token_id=config.eos_id if bos_eos else None,
        pad_token_id=None,
        initializer_range=config.initializer_range, attn_implementation=config.attention,
    )


def _unified_terms(hidden, targets, weight):
    logits = (hidden @ weight.T).float()
    lse = torch.logsumexp(logits, -1)
    return lse - logits.gather(-1, targets[:, None]).squeeze(-1), lse


def _depth_terms(hidden, targets, heads):
    logits = torch.einsum("fkd,kcd->fkc", hidden, heads).float()
    lse = torch.logsumexp(logits, -1)
    return lse - logits.gather(-1, targets[..., None]).squeeze(-1), lse


def _chunked(fn, rows: int, sliced: list, shared: list, chunk: int):
    """fn over row chunks; with gradients, each chunk under activation checkpointing, so only one chunk's logits
    exist at a time in the forward and in the backward (the 130k-way head at 1024 steps x batch 8 would otherwise
    hold GBs)."""
    out = []
    for a in range(0, max(rows, 1), chunk):  # one (empty) chunk when nothing is scored
        args = [t[a:a + chunk] for t in sliced] + shared
        out.append(checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args))
    return [torch.cat(parts) for parts in zip(*out)]


_compiled: dict = {}


def _terms(fn, compiled: bool):
    """`fn` (`_unified_terms` or `_depth_terms`), or with --compile its torch.compile (fused kernels; dynamic: the
    number of rows changes every micro-batch), made once per process."""
    if not compiled:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


class UnifiedHead(nn.Linear):
    """The unified head: a bias-free Linear whose forward, given targets, returns their (NLL, log-sum-exp) through
    `_chunked`, so the loss runs through the head module's own call and FSDP2 (a unit of its own) gathers the
    weight there and reduces its gradient after. Without targets it is the plain Linear (logits)."""

    def __init__(self, width: int, vocab: int):
        super().__init__(width, vocab, bias=False)

    def forward(self, hidden, targets=None, compiled: bool = False):
        if targets is None:
            return super().forward(hidden)
        chunk = max(1, CHUNK_ELEMENTS // self.out_features)
        return _chunked(_terms(_unified_terms, compiled), len(targets), [hidden, targets], [self.weight], chunk)


class HierarchicalModel(nn.Module):
    """Backbone (`transformers.Qwen3Model` fed `inputs_embeds`; its `embed_tokens` is the flat-vocabulary table),
    the unified head, the projection into the depth width, the depth decoder (a `Qwen3Model` whose `embed_tokens`
    holds codebooks 0..K-2's codes at `k * codebook_size + code`) and the K-1 acoustic heads [K-1, C, dd]."""

    def __init__(self, config: HierarchicalConfig):
        super().__init__()
        from transformers import Qwen3Model

        self.config = config
        shape = config.shape
        self.backbone = Qwen3Model(_qwen3(shape.backbone, config, shape.backbone.seq_len, True))
        self.unified_head = UnifiedHead(shape.backbone.width, shape.unified_vocab)
        self.depth_in = nn.Linear(shape.backbone.width, shape.depth_width, bias=False)
        self.depth = Qwen3Model(_qwen3(shape.depth, config, shape.n_codebooks, False))
        self.depth_heads = nn.Parameter(torch.empty(shape.n_codebooks - 1, shape.codebook_size, shape.depth_width))
        for w in (self.unified_head.weight, self.depth_in.weight, self.depth_heads):
            nn.init.normal_(w, std=config.initializer_range)
        self.register_buffer("weights", torch.tensor(loss_weights(config.loss_weights, shape.n_codebooks)),
                             persistent=False)

    def set_loss_weights(self, scheme: str) -> None:
        """Weigh the training loss by `scheme` (`soda.loss_weights`) from now on: a model loaded to train on with
        another run's --loss-weights (the NLL vector never depends on them)."""
        self.config = replace(self.config, loss_weights=scheme)  # checks the name
        self.weights = torch.tensor(loss_weights(scheme, self.config.shape.n_codebooks), device=self.weights.device)

    # --- pieces (generation will call these one step at a time) ----------------------------------
    def embed_steps(self, codes: torch.Tensor) -> torch.Tensor:
        """[..., K] step codes -> [..., d]: a text/special step's embedding, or the sum of a frame's K codebook
        embeddings (PAD slots add nothing)."""
        k = codes.shape[-1]
        flat = codes.reshape(-1, k)
        table = self.backbone.embed_tokens.weight
        x = nn.functional.embedding_bag(flat.clamp(min=0), table, per_sample_weights=(flat != PAD).to(table.dtype),
                                        mode="sum")
        return x.view(*codes.shape[:-1], -1)

    def backbone_hidden(self, codes: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
        """[B, S, K] codes, [B, S] document ids -> [B, S, d] last hidden states, attention inside documents."""
        additive = self.unified_head.weight.dtype if self.config.attention == "eager" else None
        return self.backbone(inputs_embeds=self.embed_steps(codes), attention_mask=step_mask(doc_ids, additive),
                             position_ids=step_positions(doc_ids), use_cache=False).last_hidden_state

    def depth_hidden(self, hidden: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Teacher-forced depth pass: [F, d] backbone states (each the step *before* its frame) and [F, K] frames ->
        [F, K-1, dd] the outputs at positions 1..K-1, which predict codebooks 1..K-1. Frames are independent."""
        base = self.config.shape.audio_base
        prefix = self.depth.embed_tokens(frames[:, :-1] - base)  # cb k's id - base = k * C + code
        x = torch.cat([self.depth_in(hidden)[:, None], prefix], dim=1)
        return self.depth(inputs_embeds=x, use_cache=False).last_hidden_state[:, 1:]

    # --- the training loss ---------------------------------------------------------------------
    def forward(self, batch: dict, z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """A step batch (`regroup_batch`) -> (loss, sums [2, G] float64: per-kind NLL sums and target counts).

        Scored: every step t+1 whose step t is in the same document (not padding; and, with a `loss_mask`, marked):
        its primary token through the unified head, and when it is a frame its codebooks 1..K-1 through the depth
        heads. loss = sum w (nll + z lse^2) / sum w over those targets, w by kind (`loss_weights`); the sums are
        unweighted, so the NLL vector does not depend on the weights."""
        shape = self.config.shape
        codes, doc = batch["codes"], batch["doc_ids"]
        k, c = shape.n_codebooks, shape.codebook_size
        h = self.backbone_hidden(codes, doc)
        valid = (doc[:, 1:] == doc[:, :-1]) & (doc[:, :-1] >= 0)
        if "loss_mask" in batch:
            valid = valid & batch["loss_mask"][:, 1:].bool()
        prev, nxt = h[:, :-1], codes[:, 1:]
        target = nxt[..., 0][valid]
        compiled = getattr(self, "soda_compiled_loss", False)
        nll, lse = self.unified_head(prev[valid], target, compiled)
        groups = self._group_of(target)
        w = self.weights[groups]
        num = (w * (nll + z_loss * lse.square())).sum()
        den = w.sum()
        sums = torch.zeros(2, 2 + k, dtype=torch.float64, device=h.device)
        sums[0].index_add_(0, groups, nll.detach().double())
        sums[1].index_add_(0, groups, torch.ones_like(nll, dtype=torch.float64))
        if k > 1:
            is_frame = valid & (nxt[..., 1] != PAD)
            frames, before = nxt[is_frame], prev[is_frame]
            scored = len(frames) > 0
            if not scored:
                # The depth decoder still runs, on a stand-in frame weighted 0: every rank then takes part in the
                # same collectives (FSDP gathers the depth layers in their forward; DDP reduces every gradient), and
                # the depth parameters get zero gradients.
                frames = shape.audio_base + torch.arange(k, device=h.device)[None] * c
                before = h[0, :1]
            hd = self.depth_hidden(before, frames)
            code = frames[:, 1:] - shape.audio_base - torch.arange(1, k, device=h.device) * c
            chunk = max(1, CHUNK_ELEMENTS // ((k - 1) * c))
            dnll, dlse = _chunked(_terms(_depth_terms, compiled), len(frames), [hd, code], [self.depth_heads], chunk)
            dw = self.weights[2 + torch.arange(1, k, device=h.device)].expand_as(dnll) * scored
            num = num + (dw * (dnll + z_loss * dlse.square())).sum()
            den = den + dw.sum()
            if scored:
                sums[0, 3:] += dnll.detach().double().sum(0)
                sums[1, 3:] += len(frames)
        return num / den.clamp(min=1e-12), sums

    def _group_of(self, targets: torch.Tensor) -> torch.Tensor:
        """Unified-head targets -> 0 text, 1 special (the four markers, BOS, EOS), 2 semantic (codebook 0)."""
        cfg = self.config
        special = ((targets >= cfg.text_size) & (targets < cfg.shape.audio_base)) | (targets == cfg.bos_id) | (
            targets == cfg.eos_id)
        return torch.where(targets >= cfg.shape.audio_base, 2, special.long())


def prepare_for_training(model: HierarchicalModel, activation_checkpointing: bool = False,
                         compile: bool = False) -> None:
    """soda-train's --activation-checkpointing and --compile for this family, as `soda.model.prepare_for_training`
    does them for the flat one: transformers' non-reentrant per-layer checkpointing in the backbone and the depth
    decoder, then torch.compile of every layer of both, in place (state-dict keys, checkpoints and exports are
    unchanged), and of the loss's per-chunk arithmetic. Dynamic shapes: a micro-batch's frame count (and outside
    training, its step count) changes from one micro-batch to the next."""
    stacks = (model.backbone, model.depth)
    if activation_checkpointing:
        for stack in stacks:
            stack.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile:
        for stack in stacks:
            for layer in stack.layers:
                layer.compile(dynamic=True)
        model.soda_compiled_loss = True


def nll_vector(sums: torch.Tensor, groups: list[str]) -> dict[str, float]:
    """Mean NLL (nats) per kind from `forward`'s sums; kinds without targets are left out."""
    return {name: float(sums[0, i] / sums[1, i]) for i, name in enumerate(groups) if sums[1, i] > 0}


def count_parameters(model: HierarchicalModel) -> dict[str, int]:
    """Counted on the module: total, and without the input tables and output heads."""
    total = sum(p.numel() for p in model.parameters())
    tables = (model.backbone.embed_tokens.weight.numel() + model.unified_head.weight.numel()
              + model.depth.embed_tokens.weight.numel() + model.depth_heads.numel())
    return {"total": total, "non_embedding": total - tables}


# --------------------------------------------------------------------------------------------
# The exported form: a Hugging Face-style directory (config.json + model.safetensors)
# --------------------------------------------------------------------------------------------
# Plain functions, not a transformers PreTrainedModel subclass: the model is no transformers causal LM (steps in, a
# depth pass per frame), and soda.checkpoints loads it; what an HF directory must say is in config.json's model_type.
MODEL_TYPE = "soda_hierarchical"
ARCHITECTURE = "HierarchicalModel"  # config.json's "architectures": this module's class
WEIGHTS = "model.safetensors"


def config_from_dict(d: dict) -> HierarchicalConfig:
    """The inverse of `dataclasses.asdict(config)` (what checkpoints and config.json hold)."""
    d = dict(d)
    shape = dict(d.pop("shape"))
    shape["backbone"] = ModelShape(**shape["backbone"])
    return HierarchicalConfig(HierarchicalShape(**shape), **d)


def is_export(directory) -> bool:
    """Whether `directory` holds a hierarchical export (its config.json names `MODEL_TYPE`)."""
    import json
    from pathlib import Path

    config = Path(directory) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def save_export(config: HierarchicalConfig, state_dict: dict, directory) -> None:
    """Write config.json (model_type `MODEL_TYPE`, architectures, the config) and model.safetensors (the state dict,
    checked against the model the config builds: same names and shapes) into `directory`."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from safetensors.torch import save_file

    with torch.device("meta"):
        expected = HierarchicalModel(config).state_dict()
    if set(state_dict) != set(expected):
        wrong = sorted(set(state_dict) ^ set(expected))
        raise ValueError(f"the weights do not fit the config: {wrong[0]} ({len(wrong)} names differ)")
    for name, t in expected.items():
        if tuple(state_dict[name].shape) != tuple(t.shape):
            raise ValueError(f"{name} is {tuple(state_dict[name].shape)}, the config needs {tuple(t.shape)}")
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
    directory = Path(directory)
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(
        {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "dtype": str(dtype).removeprefix("torch."),
         "vocab_size": config.shape.backbone.vocab, "soda_hierarchical": asdict(config)}, indent=2) + "\n")


def read_export_config(directory) -> HierarchicalConfig:
    import json
    from pathlib import Path

    return config_from_dict(json.loads((Path(directory) / "config.json").read_text())["soda_hierarchical"])


def load_export(directory, dtype: torch.dtype | None = None, attention: str | None = None) -> HierarchicalModel:
    """A `save_export` directory -> the model (strict: every weight present, no other), in `dtype` (default: as
    saved), with `attention` ("sdpa" or "eager"; default: as saved)."""
    from pathlib import Path

    from safetensors.torch import load_file

    config = read_export_config(directory)
    if attention in ("sdpa", "eager"):
        config = replace(config, attention=attention)
    model = HierarchicalModel(config)
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS)), strict=True)
    return model.to(dtype) if dtype is not None else model
