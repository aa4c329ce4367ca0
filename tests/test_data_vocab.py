"""Every shard is checked against the run's (or the model's) vocabulary, however `--data` names it (issue 14, item 6).

Shards tokenized with 1 codebook (2,310 ids) fed by glob or brace pattern into a run on 8 codebooks (16,646 ids)
used to train silently, and soda-eval reported an NLL on them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import DEMO, http_server

from soda.evaluate.cli import main as eval_main
from soda.train.cli import main as train_main
from soda.train.sources import resolve_sources
from tokenize_audio.errors import SodaError
from tokenize_audio.vocab import Vocabulary

RUN_VOCAB = "16,646 ids: 8 codebooks of 2,048"
SHARD_VOCAB = "2,310 ids: 1 codebook of 2,048"


@pytest.fixture(scope="module")
def one_codebook(tmp_path_factory) -> Path:
    """Text shards tokenized with one codebook kept (vocabulary 2,310), as a soda-tokenize directory."""
    from tokenize_audio.cli import main as tokenize_main

    out = tmp_path_factory.mktemp("one") / "tokens"
    assert tokenize_main([str(DEMO / "text" / "kjv_proverbs.txt"), "--out", str(out), "--codec", "mimi:random",
                          "--codebooks", "1", "--text-tokenizer", "bytes", "--validation-fraction", "0.2",
                          "--texts-per-shard", "40", "--quiet"]) == 0
    assert Vocabulary.load(out).size == 2310 and len(list(out.glob("*.tar"))) >= 2
    return out


@pytest.fixture(scope="module")
def model_dir(train_tokens, tmp_path_factory) -> Path:
    """A tiny untrained export on the 8-codebook vocabulary of `train_tokens` (soda-train's export layout)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    vocab = Vocabulary.load(train_tokens)
    out = tmp_path_factory.mktemp("model") / "hf"
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab.size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=16, intermediate_size=64,
                                 tie_word_embeddings=False)).save_pretrained(out)
    vocab.save(out)
    return out


def _error(capsys, main, argv, prog) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), err
    return last


def _patterns(directory: Path) -> list[tuple[str, Path]]:
    """A glob, a brace pattern and a single shard, with the shard each will be refused for."""
    first = sorted(directory.glob("train-*.tar"))[0]
    return [(str(directory / "train-*.tar"), first), (str(directory / "train-text-{00000..00001}.tar"), first),
            (str(first), first)]


def test_soda_train_refuses_mismatched_shards_given_by_pattern(one_codebook, train_tokens, tmp_path, capsys):
    for i, (pattern, shard) in enumerate(_patterns(one_codebook)):
        out = tmp_path / f"run{i}"
        err = _error(capsys, train_main, ["--size", "tiny", "--seq-len", "128", "--batch-tokens", "1024", "--tokens",
                                          "2048", "--max-steps", "1", "--workers", "0", "--out", str(out),
                                          "--data", pattern, "--vocab", str(train_tokens)], "soda-train")
        assert f"shard {shard}" in err and SHARD_VOCAB in err and RUN_VOCAB in err, err
        assert not (out / "checkpoints").exists()


def test_soda_train_refuses_a_mismatched_pattern_beside_a_directory(one_codebook, train_tokens, tmp_path, capsys):
    """A directory source sets the run's vocabulary; a pattern source in the same mixture must agree with it."""
    err = _error(capsys, train_main, ["--size", "tiny", "--seq-len", "128", "--batch-tokens", "1024", "--tokens",
                                      "2048", "--max-steps", "1", "--workers", "0", "--out", str(tmp_path / "run"),
                                      "--data", f"speech={train_tokens}",
                                      "--data", f"text={one_codebook}/train-text-*.tar"], "soda-train")
    assert "train-text-00000.tar" in err and SHARD_VOCAB in err and RUN_VOCAB in err, err


def test_soda_eval_refuses_mismatched_shards_given_by_pattern(one_codebook, model_dir, tmp_path, capsys):
    for pattern, shard in _patterns(one_codebook):
        err = _error(capsys, eval_main, [str(model_dir), "--tasks", "nll", "--data-for", f"nll={pattern}", "--out",
                                         str(tmp_path / "eval")], "soda-eval")
        assert f"shard {shard}" in err and SHARD_VOCAB in err and RUN_VOCAB in err and "model" in err, err
    assert not (tmp_path / "eval").exists()


def test_soda_eval_scores_matching_shards_given_by_pattern(train_tokens, model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert eval_main([str(model_dir), "--tasks", "nll", "--data-for",
                      f"nll={train_tokens}/validation-*.tar", "--codec", "mimi:random", "--out", str(out), "--quiet",
                      "--limit", "2"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_validation_patterns_and_urls_are_checked_too(one_codebook, train_tokens):
    bad = str(sorted(one_codebook.glob("validation-*.tar"))[0])
    with pytest.raises(SodaError, match=f"--val-data .*shard {bad} .*{SHARD_VOCAB}"):
        resolve_sources([str(train_tokens)], [bad], {}, None)
    with http_server(one_codebook) as base:
        with pytest.raises(SodaError, match=f"train-text-00000.tar .*{SHARD_VOCAB}.*{RUN_VOCAB}"):
            resolve_sources([f"{base}/train-text-{{00000..00001}}.tar"], [], {}, str(train_tokens))


def test_shards_without_a_vocabulary_beside_them_are_used_with_a_warning(train_tokens, tmp_path, capsys):
    """Shards copied away from their soda-tokenize directory (or read through a pipe: command) carry nothing to check:
    they are used, and one warning says so and names one."""
    alone = tmp_path / "alone"
    alone.mkdir()
    for shard in train_tokens.glob("train-*.tar"):
        shutil.copy(shard, alone)
    capsys.readouterr()
    sources, vocab = resolve_sources([str(alone / "train-*.tar"), f"pipe:cat {alone}/train-text-00000.tar"], [], {},
                                     str(train_tokens))
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "warning: cannot check the vocabulary of 3 shards" in err, err
    assert str(alone / "train-speech-00000.tar") in err and len(sources[0].train) == 2
