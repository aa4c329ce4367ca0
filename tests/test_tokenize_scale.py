"""soda-tokenize at scale (issue 16, part 2): --part I/N job arrays, --finalize, and the Ray engine all give the
single-process run's shards and manifest byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tokenize_audio.cli import main as tokenize_main

# Timing fields: the only sidecar contents allowed to differ between runs.
TIMING = {"seconds"}


def _tokenize(corpus: Path, out: Path, *extra: str) -> int:
    return tokenize_main([str(corpus), "--out", str(out), "--codec", "mimi:random", "--text-tokenizer", "bytes",
                          "--recordings-per-shard", "1", "--validation-fraction", "0", "--quiet", *extra])


def _contents(out: Path) -> dict:
    """Every output file's bytes, sidecars without their timing fields."""
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".json" and path.name.startswith(("train-", "validation-")):
                data = {k: v for k, v in json.loads(data).items() if k not in TIMING}
            files[str(path.relative_to(out))] = data
    return files


@pytest.fixture(scope="module")
def corpus_with_bad_file(small_corpus, tmp_path_factory) -> Path:
    """The small corpus plus one unreadable recording, so skipping is compared too."""
    root = tmp_path_factory.mktemp("scale") / "speech"
    shutil.copytree(small_corpus, root)
    bad = root / "broken"
    bad.mkdir()
    (bad / "broken-0001.flac").write_bytes(b"not audio at all")
    (bad / "broken-0001.txt").write_text("a transcript for audio that cannot be read\n")
    return root


@pytest.fixture(scope="module")
def single_run(corpus_with_bad_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "tokens"
    assert _tokenize(corpus_with_bad_file, out) == 0
    return out


def test_parts_then_finalize_equal_the_single_run(corpus_with_bad_file, single_run, tmp_path, capsys):
    out = tmp_path / "tokens"
    assert _tokenize(corpus_with_bad_file, out, "--part", "2/2") == 0
    assert "soda-tokenize --finalize" in capsys.readouterr().out
    assert not (out / "manifest.json").exists()
    with pytest.raises(SystemExit):
        tokenize_main(["--finalize", str(out)])
    assert "3 of 5 planned shards are not finished" in capsys.readouterr().err
    assert _tokenize(corpus_with_bad_file, out, "--part", "1/2") == 0  # the last part writes the manifest
    assert _contents(out) == _contents(single_run)
    (out / "manifest.json").unlink()
    assert tokenize_main(["--finalize", str(out)]) == 0
    assert _contents(out) == _contents(single_run)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["path"].endswith("broken-0001.flac") for s in manifest["skipped"]] == [True]


def test_a_part_with_work_to_do_removes_the_manifest_until_the_last_part_finishes(
        corpus_with_bad_file, single_run, tmp_path):
    out = tmp_path / "tokens"
    shutil.copytree(single_run, out)
    for name in ("train-speech-00000", "train-speech-00001"):  # one shard of each part lost
        (out / f"{name}.json").unlink()
    assert _tokenize(corpus_with_bad_file, out, "--part", "2/2") == 0
    assert not (out / "manifest.json").exists()  # it would list a shard that part 1 has not rewritten yet
    assert _tokenize(corpus_with_bad_file, out, "--part", "1/2") == 0
    assert _contents(out) == _contents(single_run)


def test_parts_are_disjoint_and_cover_the_plan():
    from tokenize_audio.pipeline import ShardPlan, select_part

    plans = [ShardPlan(f"train-speech-{j:05d}", "train", "speech") for j in range(7)]
    parts = [select_part(plans, i, 3) for i in (1, 2, 3)]
    assert sorted(p.name for part in parts for p in part) == [p.name for p in plans]


def test_part_flag_is_checked(corpus_with_bad_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _tokenize(corpus_with_bad_file, tmp_path / "x", "--part", "3/2")
    assert "expected I/N" in capsys.readouterr().err


def test_ray_engine_without_ray_says_how_to_install(corpus_with_bad_file, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(SystemExit):
        _tokenize(corpus_with_bad_file, tmp_path / "x", "--engine", "ray")
    err = capsys.readouterr().err
    assert "pip install 'ray[data]" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def local_ray():
    """One local 2-CPU Ray instance for this module (it takes several seconds to start)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_equals_the_single_run_and_resumes_an_interrupted_run(
        local_ray, corpus_with_bad_file, single_run, tmp_path):
    out = tmp_path / "tokens"
    # An interrupted run: half the shards written (by --part), as a killed job leaves them.
    assert _tokenize(corpus_with_bad_file, out, "--part", "1/2") == 0
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("train-speech-*.tar")}
    assert _tokenize(corpus_with_bad_file, out, "--engine", "ray", "--cpu-workers", "1") == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("train-speech-*.tar") if p.name in kept} == kept
    assert _contents(out) == _contents(single_run)

    fresh = tmp_path / "fresh"
    assert _tokenize(corpus_with_bad_file, fresh, "--engine", "ray") == 0
    assert _contents(fresh) == _contents(single_run)
