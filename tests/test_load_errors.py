"""Damaged model files met by soda-eval and soda-generate: one line naming the file, no traceback (issue 14,
item 13)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soda.checkpoints import load_model
from soda.evaluate.cli import main as eval_main
from soda.generate.cli import main as generate_main
from tokenize_audio.errors import SodaError
from tokenize_audio.vocab import Vocabulary, byte_tokenizer


def export_tiny(directory: Path, shard_size: str | None = None) -> Path:
    """A tiny Qwen3 in soda-train's export layout (config, safetensors weights, vocab.json)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    vocab = Vocabulary.build(byte_tokenizer(), 2, 64)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab.size, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         intermediate_size=64, tie_word_embeddings=False))
    model.save_pretrained(directory, **({"max_shard_size": shard_size} if shard_size else {}))
    vocab.save(directory)
    return directory


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _one_line(capsys, main, argv, prog: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: "), err
    return err


@pytest.mark.parametrize("keep", [None, 4, 0], ids=["half", "header-cut", "empty"])
def test_truncated_safetensors_is_one_line_naming_the_file(tmp_path, capsys, keep):
    model = export_tiny(tmp_path / "run" / "hf")
    truncate(model / "model.safetensors", keep)
    for source in (model, tmp_path / "run"):  # the export itself, and the run directory that holds it
        err = _one_line(capsys, eval_main, [str(source), "--tasks", "nll", "--out", str(tmp_path / "eval")],
                        "soda-eval")
        assert f"{model / 'model.safetensors'}:" in err and "truncated" in err
        err = _one_line(capsys, generate_main, [str(source), "tts", "hello", "--out", str(tmp_path / "gen")],
                        "soda-generate")
        assert f"{model / 'model.safetensors'}:" in err and "truncated" in err
    assert not (tmp_path / "eval").exists() and not (tmp_path / "gen").exists()


def test_a_damaged_shard_of_a_sharded_export_is_the_one_named(tmp_path):
    model = export_tiny(tmp_path / "hf", shard_size="20KB")
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) > 1
    truncate(shards[1])
    with pytest.raises(SodaError, match=f"^{shards[1]}: .*truncated"):
        load_model(str(model), device="cpu")


def test_an_intact_export_still_loads(tmp_path):
    loaded = load_model(str(export_tiny(tmp_path / "hf")), device="cpu")
    assert loaded.model is not None and loaded.vocab.size == 258 + 4 + 2 * 64  # bytes + BOS/EOS, specials, codes


def test_init_from_a_truncated_export_is_one_line(train_tokens, tmp_path, capsys):
    """soda-train --init-from (and so soda-finetune) reads the same files."""
    from conftest import tiny_args

    from soda.train.cli import main as train_main

    model = export_tiny(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text().replace(
        f'"vocab_size": {Vocabulary.build(byte_tokenizer(), 2, 64).size}', '"vocab_size": 16646'))
    truncate(model / "model.safetensors")
    args = tiny_args(train_tokens, tmp_path / "run", steps=2, **{"--size": None, "--init-from": str(model)})
    err = _one_line(capsys, train_main, args, "soda-train")
    assert f"{model / 'model.safetensors'}:" in err and "truncated" in err
