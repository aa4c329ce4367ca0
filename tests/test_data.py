"""Sources and vocabularies, document masking, schedule and config arithmetic (the window order: test_data_order)."""

from __future__ import annotations

import pytest
import torch

from soda.train.config import TrainConfig, make_config, parse_count, soda_peak_lr
from soda.train.optim import wsd_factor
from soda.train.sources import resolve_sources
from tokenize_audio.errors import SodaError


@pytest.fixture(scope="module")
def sources(train_tokens):
    return resolve_sources([f"speech={train_tokens}", f"text={train_tokens}"], [], {"speech": 0.8, "text": 0.2},
                           None)


def test_sources_need_a_vocabulary_and_matching_ones(train_tokens, tmp_path):
    with pytest.raises(SodaError, match="--vocab"):
        resolve_sources([str(train_tokens / "train-*.tar")], [], {}, None)
    srcs, vocab = resolve_sources([str(train_tokens / "train-*.tar")], [], {}, str(train_tokens))
    assert len(srcs[0].train) == 2 and vocab.size == 16646
    with pytest.raises(SodaError, match="not found"):
        resolve_sources([str(tmp_path / "nothing-{000..003}.tar")], [], {}, str(train_tokens))


# --- masking ---------------------------------------------------------------------------------
def test_packed_documents_give_their_standalone_logits(sources):
    from soda.model import attention_inputs, build_model
    from soda.train.loss import token_nll

    _, vocab = sources
    for attention in ("sdpa", "eager"):
        model = build_model(TrainConfig(size="tiny").shape(vocab.size), vocab, 0, attention=attention).eval()
        g = torch.Generator().manual_seed(0)
        a, b = torch.randint(0, vocab.size, (1, 9), generator=g), torch.randint(0, vocab.size, (1, 6), generator=g)
        doc = torch.tensor([[0] * 9 + [1] * 6])
        with torch.no_grad():
            packed = model(torch.cat([a, b], 1), **attention_inputs(model, doc)).logits
            assert torch.allclose(packed[:, :9], model(a).logits, atol=1e-5)
            assert torch.allclose(packed[:, 9:], model(b).logits, atol=1e-5)
            unmasked = model(torch.cat([a, b], 1)).logits
            assert not torch.allclose(unmasked[:, 9:], model(b).logits, atol=1e-3)
            nll, _, _, valid = token_nll(model, {"input_ids": torch.cat([a, b], 1), "doc_ids": doc})
        assert valid.tolist() == [[True] * 8 + [False] + [True] * 5]  # b's first token is not scored


def test_flex_attention_block_mask_gives_the_dense_document_mask_results(sources):
    """`--attention flex_attention` (the CUDA default): the same NLL as sdpa's dense mask, which the test above ties
    to standalone documents. Forward only: torch has no flex attention backward on the CPU (soda-train refuses it
    there); on the CPU flex attention compiles a C++ kernel first (tens of seconds)."""
    from soda.model import attention_inputs, build_model, default_attention
    from soda.train.loss import lm_loss

    _, vocab = sources
    assert default_attention("cpu") == "sdpa" and default_attention("cuda") == "flex_attention"
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, vocab.size, (2, 40), generator=g),
             "doc_ids": torch.tensor([[0] * 13 + [1] * 27, [0] * 30 + [1] * 4 + [2] * 6])}
    results = {}
    for attention in ("sdpa", "flex_attention"):
        model = build_model(TrainConfig(size="tiny").shape(vocab.size), vocab, 0, attention=attention).eval()
        assert type(attention_inputs(model, batch["doc_ids"])["attention_mask"]).__name__ == (
            "BlockMask" if attention == "flex_attention" else "Tensor")
        with torch.no_grad():
            loss, nll, _, _ = lm_loss(model, batch, 1e-4)
        results[attention] = loss.item(), nll
    assert results["flex_attention"][0] == pytest.approx(results["sdpa"][0], rel=1e-6)
    torch.testing.assert_close(results["flex_attention"][1], results["sdpa"][1], rtol=1e-5, atol=1e-5)


# --- schedule and config ---------------------------------------------------------------------
def test_wsd_schedule():
    f = [wsd_factor(s, 100, 0.1, 0.2) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[79] == 1.0
    assert f[80] == pytest.approx(1.0) and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)
    assert f[100] == 0.0 and max(f) == 1.0


def test_counts_steps_and_lr_rule():
    assert parse_count("500B") == 500_000_000_000 and parse_count("2.1M") == 2_100_000 and parse_count(4096) == 4096
    cfg = make_config({"size": "1b", "tokens": "500B"})
    assert cfg.batch_sequences == 512 and cfg.steps == round(500e9 / (512 * 4096))
    assert cfg.peak_lr(1536) == pytest.approx(0.003 * 2**0.5 * (1024 / 1536) ** 0.5)
    assert soda_peak_lr(512, 512) == pytest.approx(0.003 * 2**0.5)  # width floored at 1024
    for bad in ("0", "-3B", "many", "1e400"):
        with pytest.raises(SodaError):
            parse_count(bad)


def test_batch_layout():
    from soda.train.plan import batch_layout

    cfg = make_config({"size": "tiny", "batch_tokens": 512 * 4096, "micro_batch": 8})
    assert batch_layout(cfg, 8) == (8, 8)
    assert batch_layout(make_config({"size": "tiny", "batch_tokens": 512 * 4096}), 8) == (64, 1)
    with pytest.raises(SodaError, match="micro-batch"):
        batch_layout(make_config({"size": "tiny", "micro_batch": 7}), 8)
    with pytest.raises(SodaError, match="devices"):
        batch_layout(cfg, 3)


def test_every_shipped_config_loads():
    from pathlib import Path

    from soda.train.config import load_yaml

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        make_config(load_yaml(path))


@pytest.mark.parametrize("size,total,non_embedding", [("135m", 0.205, 0.057), ("600m", 0.737, 0.440),
                                                       ("1.7b", 2.00, 1.41), ("4b", 4.37, 3.63)])
def test_dry_run_reports_soda_sizes(capsys, size, total, non_embedding):
    from soda.train.cli import main

    assert main(["--size", size, "--tokens", "500B", "--dry-run"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("parameters:"))
    got_total, got_non = (int(x.split()[0].replace(",", "")) for x in line.removeprefix("parameters: ").split(", "))
    assert got_total / 1e9 == pytest.approx(total, abs=0.005) and got_non / 1e9 == pytest.approx(non_embedding,
                                                                                                  abs=0.005)
    assert "238,419 steps of 512 x 4096" in out  # 500B / (512 x 4096)
    assert "H100" in out and "days" in out
    assert f"AdamW moments (fp32, 16 B per parameter): {got_total * 16 / 2**30:,.1f} GiB;" in out


def test_dry_run_gives_model_state_memory_per_device_for_ddp_and_fsdp(capsys):
    from soda.train.cli import main

    assert main(["--size", "4b", "--dry-run", "--devices", "8"]) == 0
    # 4,374,089,216 parameters x 16 bytes: 65.2 GiB on every DDP rank, an eighth of it on each FSDP rank
    assert ": 65.2 GiB with DDP, 8.1 GiB with --strategy fsdp over 8 devices;" in capsys.readouterr().out


def test_dry_run_gives_the_raw_audio_and_codec_gpu_hours(capsys):
    from soda.train.cli import main

    assert main(["--size", "1b", "--tokens", "500B", "--dry-run", "--codec-rate", "2000"]) == 0
    # 500B tokens at 100 audio tokens per second: 1.39M hours of speech (the corpus-scale issue's own figure)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("raw audio"))
    assert "at most 1,388,891 hours" in line and "694.4 GPU-hours at 2000 audio-s per GPU-s" in line


def test_dry_run_matches_the_real_model(capsys):
    from soda.model import build_model, count_parameters
    from tokenize_audio.vocab import Vocabulary, byte_tokenizer

    vocab = Vocabulary.build(byte_tokenizer(), 8, 2048)
    counted = count_parameters(build_model(TrainConfig(size="135m").shape(vocab.size), vocab, 0))
    from soda.shape import params

    shape = TrainConfig(size="135m").shape(vocab.size)
    assert counted == {"total": params(shape, "total"), "non_embedding": params(shape, "non-embedding")}
