"""The model: a stock transformers `Qwen3ForCausalLM`, so every checkpoint loads anywhere Qwen3 does.

SODA's decoder is Qwen3's (RMSNorm eps 1e-5, SwiGLU, QK-norm, no biases) with untied embeddings
and Llama-3.1-style RoPE scaling. Packed windows hold several documents; `document_mask` turns
their document ids into the block-diagonal causal mask that keeps attention inside a document.
`load_pretrained` is soda-train's --init-from for this family, `load_pretrained_hierarchical` for `soda.hierarchical`'s.
"""

from __future__ import annotations

from pathlib import Path

import torch

from soda.shape import ModelShape, params
from tokenize_audio.errors import SodaError, first_line
from tokenize_audio.vocab import Vocabulary

ORIGINAL_CONTEXT = 8192  # Llama-3.1 RoPE scaling: original length 8192, low 1, high 4


def qwen3_config(shape: ModelShape, vocab: Vocabulary, rope_theta: float = 500_000.0,
                 rope_factor: float = 8.0, attention: str = "sdpa"):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=shape.vocab,
        hidden_size=shape.width,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        intermediate_size=shape.ffn,
        max_position_embeddings=max(shape.seq_len, ORIGINAL_CONTEXT) * int(max(rope_factor, 1)),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": rope_theta, "factor": rope_factor,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": ORIGINAL_CONTEXT},
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eos_id,
        pad_token_id=vocab.eos_id,
        attn_implementation=attention,
    )


def build_model(shape: ModelShape, vocab: Vocabulary, seed: int, **kwargs):
    """A freshly initialised Qwen3ForCausalLM (fp32 master weights), seeded."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(qwen3_config(shape, vocab, **kwargs))


def load_pretrained(source: str, vocab: Vocabulary, attention: str = "sdpa"):
    """Start from an HF directory or hub id; its vocabulary must be the data's."""
    from transformers import AutoModelForCausalLM

    check_family(source, "flat")

    path = Path(source)
    if path.exists() and not (path / "config.json").is_file():
        raise SodaError(f"--init-from {source}: no config.json there (expected a Hugging Face model directory)")
    if (path / "config.json").is_file():  # check before loading gigabytes of weights
        import json

        size = json.loads((path / "config.json").read_text()).get("vocab_size")
        if size is not None and size != vocab.size:
            raise SodaError(f"--init-from {source}: the model's vocabulary has {size:,} ids but the data's has "
                            f"{vocab.size:,}; tokenize with the same text tokenizer and codec as the model")
    if (path / "config.json").is_file():
        from soda.checkpoints import check_weight_files

        check_weight_files(path)  # a truncated safetensors file: one line naming it, not safetensors' traceback
    try:
        model = AutoModelForCausalLM.from_pretrained(source, attn_implementation=attention, dtype=torch.float32)
    except OSError as e:
        raise SodaError(f"--init-from {source}: cannot load ({first_line(e)})") from None
    if model.config.vocab_size != vocab.size:
        raise SodaError(f"--init-from {source}: the model's vocabulary has {model.config.vocab_size:,} ids but the "
                        f"data's has {vocab.size:,}; tokenize with the same text tokenizer and codec as the model")
    saved = path / "vocab.json"
    if saved.is_file() and not Vocabulary.load(path).matches(vocab):
        raise SodaError(f"--init-from {source}: its vocab.json differs from the data's vocabulary (ids would mean "
                        f"other tokens)")
    from soda.checkpoints import first_nonfinite

    if (bad := first_nonfinite(model.state_dict())) is not None:
        raise SodaError(f"--init-from {source}: {bad} holds a NaN or Inf; a model that diverged cannot be trained "
                        f"from (take an earlier checkpoint's export)")
    return model.train()  # from_pretrained returns eval mode; training starts from train mode as a fresh model


def check_family(source: str, architecture: str) -> None:
    """--init-from's model must be of the run's --architecture (each family's loader asks first): one line naming
    the path otherwise, read from its config before any weights."""
    from soda.checkpoints import family_of

    family = family_of(source)
    if family is not None and family != architecture:
        raise SodaError(f"--init-from {source}: a {family} model, but this run is --architecture {architecture} (a run "
                        f"starts from a model of its own family)")


def load_pretrained_hierarchical(source: str, vocab: Vocabulary, attention: str = "sdpa",
                                 loss_weights: str = "uniform"):
    """--init-from for --architecture hierarchical: a hierarchical export (config.json model_type soda_hierarchical,
    e.g. a run's hf/), a hierarchical run directory or its `.ckpt` (`soda.checkpoints.load_model`), in fp32 and train
    mode. Its shape and RoPE come from the model; the attention kernel and loss weights (which the model holds) are
    this run's. Its vocabulary must be the data's."""
    from soda.checkpoints import first_nonfinite, load_model

    check_family(source, "hierarchical")

    def load(weights: bool):
        try:
            return load_model(source, device="cpu", dtype=torch.float32, attention=attention, weights=weights,
                              hierarchical=True)
        except SodaError as e:  # its messages start with the path
            raise SodaError(f"--init-from {e}") from None

    theirs = load(weights=False).vocab  # checked before loading the weights
    if theirs.size != vocab.size:
        raise SodaError(f"--init-from {source}: the model's vocabulary has {theirs.size:,} ids but the data's has "
                        f"{vocab.size:,}; tokenize with the same text tokenizer and codec as the model")
    if not theirs.matches(vocab):
        raise SodaError(f"--init-from {source}: its vocab.json differs from the data's vocabulary (ids would mean "
                        f"other tokens)")
    model = load(weights=True).model  # attention: this run's (load_model builds it so)
    if (bad := first_nonfinite(model.state_dict())) is not None:
        raise SodaError(f"--init-from {source}: {bad} holds a NaN or Inf; a model that diverged cannot be trained "
                        f"from (take an earlier checkpoint's export)")
    model.set_loss_weights(loss_weights)
    return model.train()


def compile_model(model) -> None:
    """torch.compile every decoder layer in place (state-dict keys, checkpoints and exports are unchanged) and mark
    the model so its training loss runs the compiled chunk arithmetic. Layer by layer, as torchtitan does: one
    graph serves all layers, and FSDP's per-layer units wrap compiled layers."""
    for layer in model.model.layers:
        layer.compile(dynamic=False)
    model.soda_compiled_loss = True


def prepare_for_training(model, activation_checkpointing: bool = False, compile: bool = False) -> None:
    """soda-train's --activation-checkpointing (transformers' non-reentrant per-layer checkpointing, which works
    under FSDP and torch.compile) and --compile, in that order."""
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile:
        compile_model(model)


def shape_of(model) -> ModelShape:
    c = model.config
    return ModelShape(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                      c.head_dim, c.intermediate_size, c.vocab_size)


def count_parameters(model) -> dict[str, int]:
    """Counted on the module itself (not the formula), embedding and LM head both excluded for non-embedding."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    if head is not model.get_input_embeddings().weight:
        embedding += head.numel()
    return {"total": total, "non_embedding": total - embedding}


def describe(shape: ModelShape) -> str:
    return (f"width {shape.width}, {shape.layers} layers, {shape.heads} heads ({shape.kv_heads} kv, dim "
            f"{shape.head_dim}), FFN {shape.ffn}, vocabulary {shape.vocab:,}; "
            f"{params(shape, 'total') / 1e6:,.1f}M parameters ({params(shape, 'non-embedding') / 1e6:,.1f}M "
            f"non-embedding)")


def document_mask(doc_ids: torch.Tensor, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, S] document ids -> [B, 1, S, S] mask, causal and block-diagonal by document.

    Boolean (True = attend) for sdpa/flex attention; additive (0 / -inf-ish) in `additive_dtype`
    for eager attention, which adds the mask to the scores instead of selecting with it.
    """
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(doc_ids.shape[1], doc_ids.shape[1], dtype=torch.bool, device=doc_ids.device).tril()
    allowed = (same & causal)[:, None]
    if additive_dtype is None:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=additive_dtype, device=doc_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(additive_dtype).min)


def document_block_mask(doc_ids: torch.Tensor):
    """[B, S] document ids -> flex attention's BlockMask: the same mask as `document_mask`, but stored
    as 128 x 128 tiles, so the kernel skips every tile above the diagonal or across documents."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q, kv):
        return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)

    b, s = doc_ids.shape
    # compiled on GPUs (as transformers and torchtitan build theirs) so no dense [B, S, S] mask is materialised
    return create_block_mask(same_document_causal, B=b, H=None, Q_LEN=s, KV_LEN=s, device=doc_ids.device,
                             _compile=doc_ids.is_cuda)


def default_attention(device_type: str) -> str:
    """`--attention auto`: flex attention on CUDA (block-sparse document masks, compiled kernels), sdpa elsewhere
    (a dense boolean mask; flex attention would compile a C++ kernel on the CPU for no gain)."""
    if device_type == "cuda":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
            return "flex_attention"
        except ImportError:
            pass
    return "sdpa"


def attention_inputs(model, doc_ids: torch.Tensor) -> dict:
    """The keyword arguments that keep attention inside documents for this model's attention kernel."""
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    pos = position_ids(doc_ids)
    if impl and "flash" in impl:  # variable-length kernels find the documents from restarting positions
        return {"position_ids": pos}
    if impl == "flex_attention":
        return {"position_ids": pos, "attention_mask": document_block_mask(doc_ids)}
    additive = model.dtype if impl == "eager" else None
    return {"position_ids": pos, "attention_mask": document_mask(doc_ids, additive)}


def position_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at every document start."""
    b, s = doc_ids.shape
    idx = torch.arange(s, device=doc_ids.device).expand(b, s)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_pos = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_pos
