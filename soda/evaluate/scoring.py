"""Log-probabilities of chosen tokens under a causal LM, batched, and the bookkeeping of which tokens count.

Every likelihood task reduces to: build a token sequence, mark the tokens whose log-probability
counts (the audio of a pair, the text of an option), score many such sequences at once. Sequences
are right-padded (causal attention: padding after a token cannot change it), and only the marked
positions go through the LM head, so a 144k-word vocabulary never needs a [batch, length, vocab]
tensor.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenize_audio.encoding import length_batches
from tokenize_audio.errors import SodaError
from tokenize_audio.vocab import Vocabulary

HEAD_CHUNK = 2048  # scored positions per LM-head matmul


def codebook_choice(spec: str, vocab: Vocabulary) -> tuple[int, ...]:
    """`--codebooks`: all | semantic | N (the first N codebooks, as SODA's num_codebook_for_log_probs)."""
    k = vocab.n_codebooks
    if spec == "all":
        return tuple(range(k))
    if spec == "semantic":
        if not vocab.semantic_codebooks:
            raise SodaError("--codebooks semantic: this model's codec has no semantic codebook")
        return tuple(vocab.semantic_codebooks)
    try:
        n = int(spec)
    except ValueError:
        raise SodaError(f"--codebooks {spec}: expected all, semantic or a number 1..{k}") from None
    if not 1 <= n <= k:
        raise SodaError(f"--codebooks {spec}: the model has {k} codebooks; choose 1..{k}")
    return tuple(range(n))


def audio_mask(ids: np.ndarray, vocab: Vocabulary, codebooks=None) -> np.ndarray:
    """Which ids are audio tokens of the chosen codebooks.

    The codebook is read from each id (`audio_base + k*size + code`), so the selection is right
    for frame-major audio with any number of codebooks; SODA's script instead reshaped the flat
    frame-major span as [codebooks, frames] and kept rows, which picks wrong positions for < 8.
    """
    cb = vocab.codebook_of(ids)
    if codebooks is None:
        return cb >= 0
    return np.isin(cb, list(codebooks))


def audio_sequence(vocab: Vocabulary, codes: np.ndarray) -> np.ndarray:
    """`BOS <|audio_start|> A <|audio_end|>` with A frame-major, as SODA scores audio."""
    return np.concatenate([[vocab.bos_id, vocab.audio_start], vocab.codes_to_ids(codes), [vocab.audio_end]])


def text_sequence(vocab: Vocabulary, text: str) -> tuple[np.ndarray, np.ndarray]:
    """`BOS <|text_start|> T <|text_end|>` and the mask of T's tokens."""
    body = vocab.encode_text(text)
    ids = np.concatenate([[vocab.bos_id, vocab.text_start], body, [vocab.text_end]]).astype(np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    mask[2:2 + len(body)] = True
    return ids, mask


def reduce(log_probs: np.ndarray, how: str) -> float:
    """mean (SODA's score) or sum of the selected tokens' log-probabilities."""
    if len(log_probs) == 0:
        return float("nan")
    return float(log_probs.sum() if how == "sum" else log_probs.mean())


@torch.inference_mode()
def token_log_probs(model, sequences: list[np.ndarray], masks: list[np.ndarray], batch_tokens: int = 16384,
                    progress: bool = False, desc: str = "scoring", pad_id: int = 0) -> list[np.ndarray]:
    """log p(ids[t] | ids[:t]) for every t with masks[i][t] (t >= 1), per sequence, in order (float64), under a
    causal LM over flat ids. Tasks call `Context.log_probs`, which takes the hierarchical family to
    `soda.evaluate.hierarchical.hierarchical_log_probs` (same layout; NaN where that family gives no score)."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    body, head = model.get_decoder(), model.get_output_embeddings()
    weight = head.weight.float()
    bias = head.bias.float() if getattr(head, "bias", None) is not None else None
    out: list[np.ndarray | None] = [None] * len(sequences)
    batches = length_batches([len(s) for s in sequences], batch_tokens, longest_first=True)
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True, leave=False):
        length = len(sequences[batch[0]])
        ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), length), dtype=torch.long)
        selected = torch.zeros((len(batch), length), dtype=torch.bool)
        for row, i in enumerate(batch):
            n = len(sequences[i])
            ids[row, :n] = torch.from_numpy(np.asarray(sequences[i], dtype=np.int64))
            attention[row, :n] = 1
            selected[row, :n] = torch.from_numpy(np.asarray(masks[i], dtype=bool))
        selected[:, 0] = False  # nothing predicts the first token
        ids, attention, selected = ids.to(device), attention.to(device), selected.to(device)
        hidden = body(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
        # The hidden state at t-1 predicts the token at t.
        h = hidden[:, :-1][selected[:, 1:]]
        targets = ids[:, 1:][selected[:, 1:]]
        scores = torch.cat([
            torch.nn.functional.linear(h[j:j + HEAD_CHUNK].float(), weight, bias).log_softmax(-1)
            .gather(-1, targets[j:j + HEAD_CHUNK, None]).squeeze(-1)
            for j in range(0, len(h), HEAD_CHUNK)
        ]) if len(h) else torch.zeros(0)
        counts = selected[:, 1:].sum(1).tolist()
        for i, piece in zip(batch, torch.split(scores.double().cpu(), counts)):
            out[i] = piece.numpy()
    return out


def unscored(log_probs: np.ndarray) -> int:
    """How many of the scores are NaN: tokens the model gives no probability (the hierarchical family's audio ids
    outside whole frames, `soda.evaluate.hierarchical`); a task skips or reports them, never counts them as 0."""
    return int(np.isnan(log_probs).sum())


def check_length(n_tokens: int, max_len: int | None) -> str | None:
    """The skip reason for a sequence longer than the scoring limit, else None."""
    if max_len and n_tokens > max_len:
        return f"{n_tokens} tokens, longer than --max-len {max_len}"
    return None
