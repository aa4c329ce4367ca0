"""A run that diverges, a checkpoint that is cut short, a disk that fills: nothing saved is ever broken, and the run
can always be continued."""

from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_args
from safetensors.torch import load_file

from soda.train.cli import main
from soda.train.module import SodaModule

PY = sys.executable


def _run(args, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_all_finite(out: Path) -> None:
    """Every checkpoint (weights and optimizer moments) and the export hold only finite values."""
    from soda.checkpoints import first_nonfinite

    files = sorted((out / "checkpoints").glob("step*.ckpt"))
    assert files
    for path in files:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert first_nonfinite({"s": ckpt["state_dict"], "o": ckpt["optimizer_states"]}) is None, path
    if (out / "hf" / "model.safetensors").is_file():
        assert first_nonfinite(load_file(out / "hf" / "model.safetensors")) is None


@pytest.fixture
def diverge(monkeypatch):
    """Make chosen optimizer steps non-finite, as a diverging run makes them: an infinite gradient with a finite
    loss (the case that used to write NaN weights into every later checkpoint), or a NaN loss."""
    bad_grad, bad_loss = set(), set()
    sums = SodaModule._sums

    def on_after_backward(self):
        if self.trainer.global_step in bad_grad:
            next(self.parameters()).grad.view(-1)[0] = float("inf")

    def nan_sums(self, batch):
        loss, s = sums(self, batch)
        if self.training and self.trainer.global_step in bad_loss:
            loss = loss * float("nan")
        return loss, s

    monkeypatch.setattr(SodaModule, "on_after_backward", on_after_backward)
    monkeypatch.setattr(SodaModule, "_sums", nan_sums)
    return bad_grad, bad_loss


def test_nonfinite_steps_are_skipped_and_no_saved_file_holds_nan(diverge, train_tokens, tmp_path, capsys):
    bad_grad, bad_loss = diverge
    bad_grad.update({2, 5})
    bad_loss.add(3)
    out = tmp_path / "skip"
    code, err = _run(tiny_args(train_tokens, out, steps=8, **{"--ckpt-every": "2", "--val-every": "4",
                                                              "--on-nonfinite": "skip"}), capsys)
    assert code == 0, err[-2000:]
    assert "gradient norm is inf at step 2; update skipped" in err and "loss is nan at step 3" in err
    assert "3 skipped for a non-finite loss or gradient norm" in err
    _assert_all_finite(out)
    ckpt = torch.load(out / "checkpoints" / "step0000008.ckpt", map_location="cpu", weights_only=True)
    steps = {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert steps == {5.0}  # 8 steps, 3 skipped: the moments saw only the 5 finite updates
    rows = {int(r["step"]): r for r in _rows(out) if r.get("lr")}  # the training rows
    assert {s for s, r in rows.items() if r.get("train/skipped_steps")} == {2, 3, 5}
    assert float(rows[5]["train/skipped_steps"]) == 3 and not rows[3].get("train/loss")


def test_stop_keeps_the_last_finite_checkpoint_and_resume_may_lower_the_lr(diverge, train_tokens, tmp_path, capsys):
    bad_grad, _ = diverge
    bad_grad.add(5)
    out = tmp_path / "stop"
    args = tiny_args(train_tokens, out, steps=8, **{"--ckpt-every": "2", "--val-every": "4"})
    code, err = _run(args, capsys)
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "gradient norm is inf at step 5; stopped before updating the weights" in line
    assert "step0000004.ckpt, holds only finite values" in line and "--resume --lr" in line
    _assert_all_finite(out)
    bad_grad.clear()
    code, err = _run(args + ["--resume", "--lr", "1e-3"], capsys)
    assert code == 0, err[-2000:]
    assert "lr changed from 0.003 to 0.001 from step 4 on" in err
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 1e-3
    change = json.loads((out / "config_changes.jsonl").read_text())
    assert (change["step"], change["setting"], change["from"], change["to"]) == (4, "lr", 0.003, 0.001)
    lr = {int(r["step"]): float(r["lr"]) for r in _rows(out) if r.get("lr")}
    assert lr[3] == pytest.approx(3e-3) and lr[4] == pytest.approx(1e-3)  # flat phase of the WSD schedule
    assert lr[7] == pytest.approx(1e-3 * 0.5)  # the decay follows the new peak
    ckpt = torch.load(out / "checkpoints" / "step0000008.ckpt", map_location="cpu", weights_only=True)
    assert {g["peak_lr"] for g in ckpt["optimizer_states"][0]["param_groups"]} == {1e-3}  # AdamC's lr_peak too
    _assert_all_finite(out)
    code, err = _run(args + ["--resume", "--seed", "7"], capsys)  # what it computes still may not change
    assert code == 2 and "seed differ" in err


def test_a_truncated_newest_checkpoint_is_moved_aside_and_the_run_resumes_before_it(train_tokens, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(train_tokens, out, steps=8, **{"--ckpt-every": "2", "--val-every": "4", "--no-export": ""})
    assert _run(args + ["--max-steps", "6"], capsys)[0] == 0
    newest = out / "checkpoints" / "step0000006.ckpt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])  # a copy or sync cut short
    for attempt in range(2):  # --resume auto, as a requeued job runs it every time
        code, err = _run(args + ["--resume", "auto", "--max-steps", "8"], capsys)
        assert code == 0, err[-2000:]
        if attempt == 0:
            assert "step0000006.ckpt cannot be read" in err and "moved aside to step0000006.ckpt.corrupt" in err
            assert "Traceback" not in err
    assert (out / "checkpoints" / "step0000006.ckpt.corrupt").stat().st_size == len(data) // 3
    rows = _rows(out)
    assert {int(r["step"]) for r in rows if r.get("train/loss")} >= set(range(8))
    assert (out / "checkpoints" / "last.ckpt").resolve().name == "step0000008.ckpt"


def test_no_readable_checkpoint_is_one_line(train_tokens, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(train_tokens, out, steps=4, **{"--ckpt-every": "2", "--no-export": ""})
    assert _run(args + ["--max-steps", "2"], capsys)[0] == 0
    (out / "checkpoints" / "step0000002.ckpt").write_bytes(b"not a checkpoint")
    code, err = _run(args + ["--resume"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "no readable checkpoint" in err.strip().splitlines()[-1]


def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_no_temp_file(train_tokens, tmp_path, capsys,
                                                                             monkeypatch):
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        name = os.readlink(f"/proc/self/fd/{f.fileno()}") if hasattr(f, "fileno") else str(f)
        if "step0000004" in name:
            f.write(b"\0" * 4096)  # part of it went out before the disk filled
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    code, err = _run(tiny_args(train_tokens, out, steps=6, **{"--ckpt-every": "2", "--no-export": ""}), capsys)
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "step0000004.ckpt: cannot write the checkpoint (No space left on device)" in line
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step0000002.ckpt"]  # no temp file left
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2


def _read_only(path: Path) -> list[str]:
    """A command prefix that sees `path` read-only (a private mount namespace with a read-only bind), as a full or
    read-only file system is met on a cluster; root cannot be kept out of a directory by its mode bits."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro '{path}' '{path}'"],
                           capture_output=True)
    if probe.returncode:
        pytest.skip(f"no private mount namespace here ({probe.stderr.decode().strip()[:100]})")
    return ["unshare", "-m", "sh", "-c", f"mount --bind -o ro '{path}' '{path}' && exec \"$0\" \"$@\""]


@pytest.mark.slow
def test_a_read_only_out_is_one_line_and_leaves_the_run_intact(train_tokens, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(train_tokens, out, steps=4, **{"--ckpt-every": "2", "--no-export": "", "--workers": "0"})
    assert _run(args + ["--max-steps", "2"], capsys)[0] == 0
    before = {p.name: p.stat().st_size for p in (out / "checkpoints").iterdir()}
    prefix = _read_only(out)
    done = subprocess.run([*prefix, PY, "-m", "soda.train", *args, "--resume"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert "Read-only file system" in line and str(out) in line
    assert {p.name: p.stat().st_size for p in (out / "checkpoints").iterdir()} == before
    fresh = tmp_path / "ro" / "new"
    fresh.parent.mkdir()
    prefix = _read_only(fresh.parent)
    done = subprocess.run([*prefix, PY, "-m", "soda.train", *tiny_args(train_tokens, fresh, steps=2)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "Read-only file system" in done.stderr.strip().splitlines()[-1]


def test_exporting_a_nonfinite_checkpoint_is_refused(tiny_run, tmp_path):
    from soda.checkpoints import export_hf
    from tokenize_audio.errors import SodaError

    ckpt = torch.load(tiny_run / "checkpoints" / "step0000008.ckpt", map_location="cpu", weights_only=True)
    key = next(iter(ckpt["state_dict"]))
    ckpt["state_dict"][key].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(SodaError, match=f"not exported: {key.removeprefix('model.')} holds a NaN"):
        export_hf(bad, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_run_outputs_honour_the_umask(train_tokens, tmp_path, capsys):
    """Checkpoints, the export, config and metrics are shared the way the user's umask says (a project group reads
    them under 027), not 0600 from a temporary file's creation mode."""
    out = tmp_path / "run"
    old = os.umask(0o027)
    try:
        code, err = _run(tiny_args(train_tokens, out, steps=2, **{"--ckpt-every": "1"}), capsys)
    finally:
        os.umask(old)
    assert code == 0, err[-2000:]
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*") if not p.is_symlink()}
    assert {"checkpoints/step0000002.ckpt", "hf/model.safetensors", "config.yaml", "metrics.csv"} <= set(modes)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o750 if (out / name).is_dir() else 0o640)}
    assert not wrong


def test_a_real_divergence_stops_before_the_first_checkpoint_with_what_to_do(train_tokens, tmp_path, capsys):
    """No injection: an absurd LR blows the model up in one update; the next loss is NaN."""
    code, err = _run(tiny_args(train_tokens, tmp_path / "run", steps=4, **{"--lr": "1e30"}), capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("loss is nan at step 1; stopped before updating the weights; no "
                                                 "checkpoint was saved yet: run again with a lower --lr (or "
                                                 "--on-nonfinite skip to skip such steps)")
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))
