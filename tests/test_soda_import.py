"""soda: inputs: SODA's released pre-tokenized strings (parquet / hf datasets) -> our shards, with SODA's ids."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenize_audio.cli import main
from tokenize_audio.shards import read_shard
from tokenize_audio.vocab import AUDIO_END, AUDIO_START, BOS, EOS, TEXT_END, TEXT_START, Vocabulary


def _documents(out: Path) -> dict[str, list]:
    """split -> [(ids tuple, meta)] in manifest order."""
    manifest = json.loads((out / "manifest.json").read_text())
    return {split: [(tuple(int(i) for i in ids), meta) for f in manifest["shards"][split]
                    for _, ids, meta in read_shard(out / f)] for split in ("train", "validation")}


def _all_ids(out: Path) -> list[tuple]:
    return sorted(ids for docs in _documents(out).values() for ids, _ in docs)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, request):
    """Our own shards of the small demo corpus (bytes text tokenizer) and SODA-format strings of their documents."""
    small_corpus = request.getfixturevalue("small_corpus")
    root = tmp_path_factory.mktemp("soda-import")
    out = root / "direct"
    assert main([str(small_corpus), "--out", str(out), "--codec", "mimi:random", "--device", "cpu",
                 "--text-tokenizer", "bytes", "--validation-fraction", "0.3", "--quiet"]) == 0
    vocab = Vocabulary.load(out)
    strings = [vocab.ids_to_string(ids) for ids in _all_ids(out)]
    return out, strings


def _write_parquet(path: Path, strings: list, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": strings, **columns}), path, row_group_size=3)
    return path


def _import(inputs, out, *extra) -> dict:
    assert main([*map(str, inputs), "--out", str(out), "--text-tokenizer", "bytes", "--validation-fraction", "0.3",
                 "--quiet", *map(str, extra)]) == 0
    return json.loads((out / "manifest.json").read_text())


def test_strings_are_soda_format(demo_run):
    _, strings = demo_run
    s = strings[0]
    assert s.startswith(BOS) and s.endswith(EOS) and AUDIO_START in s and TEXT_START in s
    assert any(0xE000 <= ord(ch) < 0xE000 + 8 * 2048 for ch in s)


def test_parquet_import_gives_the_ids_of_the_original_shards(demo_run, tmp_path):
    direct, strings = demo_run
    half = len(strings) // 2
    files = [_write_parquet(tmp_path / "data" / "a.parquet", strings[:half]),
             _write_parquet(tmp_path / "data" / "sub" / "b.parquet", strings[half:])]
    out = tmp_path / "imported"
    manifest = _import([f"soda:{tmp_path / 'data'}"], out, "--texts-per-shard", "4")
    assert _all_ids(out) == _all_ids(direct)
    assert Vocabulary.load(out).to_dict() == Vocabulary.load(direct).to_dict()
    original = json.loads((direct / "manifest.json").read_text())
    assert manifest["tokens"] == original["tokens"] and manifest["documents"] == original["documents"]
    assert manifest["skipped"] == []
    # Both forms of a document share one recording key, so they land on the same side of the split.
    sides = defaultdict(set)
    forms = defaultdict(set)
    for split, docs in _documents(out).items():
        for _, meta in docs:
            sides[meta["recording"]].add(split)
            forms[meta["recording"]].add(meta["format"])
    assert all(len(s) == 1 for s in sides.values())
    assert all(f == {"text-first", "audio-first"} for f in forms.values())
    assert {"train"} in sides.values() and {"validation"} in sides.values()
    # A glob of the same files gives the same shards.
    glob_out = tmp_path / "glob"
    _import([f"soda:{tmp_path / 'data'}/**/*.parquet"], glob_out, "--texts-per-shard", "4")
    assert _all_ids(glob_out) == _all_ids(direct) and len(files) == 2


def test_bpe_import_matches_and_follows_llama3_pre_tokenizer(small_corpus, tmp_path):
    direct = tmp_path / "direct"
    assert main([str(small_corpus), "--out", str(direct), "--codec", "mimi:random", "--device", "cpu",
                 "--text-tokenizer", "bpe:300", "--quiet"]) == 0
    vocab = Vocabulary.load(direct)
    strings = [vocab.ids_to_string(ids) for ids in _all_ids(direct)]
    data = _write_parquet(tmp_path / "bpe.parquet", strings)
    # SODA's case: the run is given the tokenizer the strings were made with -> identical ids.
    same = tmp_path / "same-tokenizer"
    assert main([f"soda:{data}", "--out", str(same), "--text-tokenizer", str(direct / "text_tokenizer.json"),
                 "--quiet"]) == 0
    assert _all_ids(same) == _all_ids(direct)
    # bpe:N trained on the strings' text spans, split by Llama-3's regex: the ids decode back to the strings.
    trained = tmp_path / "trained"
    assert main([f"soda:{data}", "--out", str(trained), "--text-tokenizer", "bpe:300", "--quiet"]) == 0
    tvocab = Vocabulary.load(trained)
    assert "Split" in tvocab.text_tokenizer.to_str() and "(?i:'s|'t|'re" in tvocab.text_tokenizer.to_str()
    assert sorted(tvocab.ids_to_string(ids) for ids in _all_ids(trained)) == sorted(strings)


def test_hf_save_to_disk_and_from_parquet(demo_run, tmp_path):
    import datasets

    direct, strings = demo_run
    data = _write_parquet(tmp_path / "x.parquet", strings)
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_parquet(str(data))}).save_to_disk(str(saved))
    out = tmp_path / "hf"
    _import([f"soda:hf:{saved}:train"], out)
    assert _all_ids(out) == _all_ids(direct)
    # A folder of parquet files as NAME goes through load_dataset(..., streaming=True), the hub path.
    streamed = tmp_path / "streamed"
    _import([f"soda:hf:{data.parent}:train"], streamed)
    assert _all_ids(streamed) == _all_ids(direct)


FRAME = "".join(chr(0xE000 + k * 2048 + 7) for k in range(4))  # one frame of a 4-codebook vocabulary
GOOD = f"{BOS}{TEXT_START}hello{TEXT_END}{AUDIO_START}{FRAME * 2}{AUDIO_END}{EOS}"
BAD = {  # expected reason -> string
    "outside the vocabulary": GOOD.replace(FRAME * 2, FRAME + FRAME[:3] + chr(0xE000 + 5 * 2048 + 1)),
    "unknown special": GOOD.replace(TEXT_END, "<|text_stop|>"),
    "broken special": GOOD.replace(AUDIO_END, "<|audio_end"),
    "cuts a frame": GOOD.replace(FRAME * 2, FRAME + FRAME[:3]),
    "not frame-major": GOOD.replace(FRAME * 2, FRAME[1] + FRAME[0] + FRAME[2:] + FRAME),
    "never closed": GOOD.replace(AUDIO_END, ""),
    "audio character inside a text span": GOOD.replace("hello", "hel" + FRAME[0] + "lo"),
    "text outside": GOOD.replace(TEXT_END, TEXT_END + "stray"),
}


def test_each_bad_string_is_skipped_with_its_reason(tmp_path):
    data = _write_parquet(tmp_path / "bad.parquet", [GOOD, *BAD.values()])
    out = tmp_path / "out"
    manifest = _import([f"soda:{data}"], out, "--codebooks", "4")
    reasons = [s["reason"] for s in manifest["skipped"]]
    assert len(reasons) == len(BAD)
    for expected, reason in zip(BAD, reasons):
        assert expected in reason, (expected, reason)
    assert manifest["skipped"][0]["path"].endswith("bad.parquet[1]")
    assert manifest["documents"] == 1
    (ids, meta), = [d for docs in _documents(out).values() for d in docs]
    vocab = Vocabulary.load(out)
    assert ids[0] == vocab.bos_id and ids[-1] == vocab.eos_id and ids.count(vocab.bos_id) == 1
    assert meta["tokens"] == {"text": 5, "special": 6, "semantic": 2, "acoustic": 6}
    assert vocab.ids_to_string(ids) == GOOD


def test_bos_and_eos_are_never_doubled(tmp_path):
    body = f"{TEXT_START}hi{TEXT_END}{AUDIO_START}{FRAME}{AUDIO_END}"
    plain = f"{BOS}A text-corpus document.{EOS}"
    data = _write_parquet(tmp_path / "b.parquet", [BOS + body + EOS, body, plain])
    out = tmp_path / "out"
    manifest = _import([f"soda:{data}"], out, "--codebooks", "4", "--validation-fraction", "0")
    docs = [ids for ids, _ in sum(_documents(out).values(), [])]
    assert len(docs) == 3 and docs[0] == docs[1]
    assert manifest["shards_by_kind"]["text"]["train"] == ["train-text-00000.tar"]
    vocab = Vocabulary.load(out)
    assert vocab.ids_to_string(docs[2]) == plain and list(docs[2]).count(vocab.bos_id) == 1


def test_workers_do_not_change_the_shards_and_a_rerun_resumes(demo_run, tmp_path):
    _, strings = demo_run
    data = _write_parquet(tmp_path / "d.parquet", strings)
    one, two = tmp_path / "one", tmp_path / "two"
    _import([f"soda:{data}"], one, "--texts-per-shard", "3", "--workers", "1")
    _import([f"soda:{data}"], two, "--texts-per-shard", "3", "--workers", "2")
    tars = sorted(p.name for p in one.glob("*.tar"))
    assert len(tars) > 2 and tars == sorted(p.name for p in two.glob("*.tar"))
    assert all((one / t).read_bytes() == (two / t).read_bytes() for t in tars)
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert {k: v for k, v in m1.items() if k != "shard_stats"} == {k: v for k, v in m2.items() if k != "shard_stats"}
    # Re-running keeps every finished unit; a changed row converts only its own unit again.
    before = {t: (one / t).stat().st_mtime_ns for t in tars}
    _import([f"soda:{data}"], one, "--texts-per-shard", "3")
    assert {t: (one / t).stat().st_mtime_ns for t in tars} == before
    changed = list(strings)
    changed[0] = changed[0].replace(TEXT_END, "<|bad|>", 1)
    _write_parquet(tmp_path / "d.parquet", changed)
    manifest = _import([f"soda:{data}"], one, "--texts-per-shard", "3")
    assert len(manifest["skipped"]) == 1
    redone = [t for t in tars if (one / t).exists() and (one / t).stat().st_mtime_ns != before[t]]
    assert redone and all(t.endswith("-00000.tar") for t in redone)
    # Fewer rows: the shards of units that no longer exist are removed.
    _write_parquet(tmp_path / "d.parquet", changed[:3])
    _import([f"soda:{data}"], one, "--texts-per-shard", "3")
    assert all(p.name.endswith("-00000.tar") for p in one.glob("*.tar")) and len(_all_ids(one)) == 2


def test_text_column_named_or_refused(demo_run, tmp_path, capsys):
    _, strings = demo_run
    table = pa.table({"doc": strings[:2], "lang": ["en", "en"]})
    pq.write_table(table, tmp_path / "c.parquet")
    with pytest.raises(SystemExit):
        main([f"soda:{tmp_path / 'c.parquet'}", "--out", str(tmp_path / "o"), "--text-tokenizer", "bytes", "--quiet"])
    assert "no text column among doc, lang; pass --text-column" in capsys.readouterr().err
    _import([f"soda:{tmp_path / 'c.parquet'}"], tmp_path / "o2", "--text-column", "doc")
    assert len(_all_ids(tmp_path / "o2")) == 2


def test_soda_inputs_are_not_mixed_with_audio(small_corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([f"soda:{tmp_path}", str(small_corpus), "--out", str(tmp_path / "o"), "--text-tokenizer", "bytes"])
    assert "cannot be mixed with audio or text inputs" in capsys.readouterr().err


def test_ids_equal_the_soda_style_tokenizer_on_whole_strings(demo_run, tmp_path):
    """Our exported tokenizer holds the specials and one added token per audio character, like SODA's released one:
    it encodes each whole string to the imported ids, and an import given it as --text-tokenizer agrees too."""
    from tokenizers import Tokenizer

    direct, strings = demo_run
    soda_tok = Tokenizer.from_file(str(direct / "tokenizer" / "tokenizer.json"))
    whole = sorted(tuple(soda_tok.encode(s, add_special_tokens=False).ids) for s in strings)
    assert whole == _all_ids(direct)
    data = _write_parquet(tmp_path / "s.parquet", strings)
    out = tmp_path / "out"
    assert main([f"soda:{data}", "--out", str(out), "--text-tokenizer", str(direct / "tokenizer"), "--quiet"]) == 0
    assert _all_ids(out) == whole
