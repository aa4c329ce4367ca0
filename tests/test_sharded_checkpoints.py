"""Sharded (FSDP) checkpoints: every rank writes its shards, a step counts only once whole, a torn one is moved aside,
a run resumes on another number of ranks, background saves, and one Hugging Face export from either layout."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_args

from soda.checkpoints import (DCP_INDEX, LIGHTNING_META, export_hf, export_step, last_checkpoint, load_checkpoint,
                              load_model, resolve_checkpoint, unreadable_reason)
from tokenize_audio.errors import SodaError

PY = sys.executable


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([PY, "-m", "soda.train", *args], capture_output=True, text=True, env=env, timeout=600)


def losses(out: Path, key: str = "train/loss") -> dict[int, float]:
    with open(out / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def fsdp_args(train_tokens, out: Path, devices: int = 2, *extra: str) -> list[str]:
    """12 sequences a step: they split over 1, 2 and 3 ranks."""
    return tiny_args(train_tokens, out, steps=6, **{"--batch-tokens": "1536", "--tokens": "9216", "--ckpt-every": "3",
                                                    "--val-every": "3"}) + [
        "--accelerator", "cpu", "--devices", str(devices), "--strategy", "fsdp", *extra]


@pytest.fixture(scope="module")
def sharded_run(train_tokens, tmp_path_factory) -> Path:
    """Six steps on two CPU ranks (gloo) under --strategy fsdp: sharded checkpoints at steps 3 and 6, and hf/."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    done = run_cli(fsdp_args(train_tokens, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_every_rank_writes_its_shards_and_a_step_appears_whole(sharded_run):
    ckpts = sharded_run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step0000003.ckpt", "step0000006.ckpt"]
    for step in ("step0000003.ckpt", "step0000006.ckpt"):
        names = {p.name for p in (ckpts / step).iterdir()}
        assert names == {"__0_0.distcp", "__1_0.distcp", DCP_INDEX, LIGHTNING_META}, names
        assert unreadable_reason(ckpts / step) is None
    assert (ckpts / "last.ckpt").resolve().name == "step0000006.ckpt" and last_checkpoint(sharded_run).is_dir()
    ckpt = load_checkpoint(ckpts / "step0000006.ckpt")
    assert ckpt["global_step"] == 6 and "soda" in ckpt and "optimizer_states" not in ckpt
    assert sorted(losses(sharded_run)) == list(range(6))


@pytest.mark.slow
def test_sharded_export_equals_the_single_file_export_of_the_same_state(sharded_run, tmp_path):
    """The streamed export of the sharded step equals save_pretrained's export of a single-file checkpoint made from
    the same directory by torch's own converter (dcp_to_torch_save), tensor for tensor; it loads in transformers."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    step = sharded_run / "checkpoints" / "step0000006.ckpt"
    dcp_to_torch_save(step, tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    single = {**torch.load(step / LIGHTNING_META, weights_only=True), "state_dict": full["state_dict"],
              "optimizer_states": [full["optimizer_0"]]}
    torch.save(single, tmp_path / "step0000006.ckpt")
    export_hf(tmp_path / "step0000006.ckpt", tmp_path / "from_file")
    ours = load_file(sharded_run / "hf" / "model.safetensors")
    theirs = load_file(tmp_path / "from_file" / "model.safetensors")
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    model = AutoModelForCausalLM.from_pretrained(sharded_run / "hf")
    assert model.config.vocab_size == ours["lm_head.weight"].shape[0]


def test_export_streams_in_bounded_files_and_equals_the_single_file_export(tmp_path, monkeypatch):
    """Without a process group: a sharded checkpoint written by DCP and a single-file one of the same state export
    the same tensors; above EXPORT_SHARD_BYTES the export is several safetensors files with their index (loaded by
    transformers as one model)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    import soda.checkpoints as checkpoints

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    state = {f"model.{k}": v for k, v in Qwen3ForCausalLM(config).state_dict().items()}
    meta = {"global_step": 5, "soda": {"model_config": config.to_dict(), "vocab": {}, "codec": None}}
    (tmp_path / "file" / "checkpoints").mkdir(parents=True)
    torch.save({**meta, "state_dict": state}, tmp_path / "file" / "checkpoints" / "step0000005.ckpt")
    sharded = tmp_path / "dir" / "checkpoints" / "step0000005.ckpt"
    dcp.save({"state_dict": state, "optimizer_0": {"state": {"x": torch.ones(3)}}}, checkpoint_id=sharded,
             no_dist=True)
    torch.save(meta, sharded / LIGHTNING_META)
    monkeypatch.setattr(checkpoints, "EXPORT_SHARD_BYTES", 40_000)
    export_hf(sharded, tmp_path / "from_dir")
    export_hf(tmp_path / "file" / "checkpoints" / "step0000005.ckpt", tmp_path / "from_file")
    files = sorted(p.name for p in (tmp_path / "from_dir").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "from_dir" / "model.safetensors.index.json").is_file()
    ours = {k: v for f in files for k, v in load_file(tmp_path / "from_dir" / f).items()}
    theirs = load_file(tmp_path / "from_file" / "model.safetensors")
    assert ours.keys() == theirs.keys() == {k.removeprefix("model.") for k in state}
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d) for d in ("from_dir", "from_file"))
    ids = torch.arange(10)[None]
    assert torch.equal(a(ids).logits, b(ids).logits)
    # a NaN is refused, naming the tensor, and nothing is written
    state["model.model.norm.weight"][0] = float("nan")
    bad = tmp_path / "bad" / "checkpoints" / "step0000005.ckpt"
    dcp.save({"state_dict": state}, checkpoint_id=bad, no_dist=True)
    torch.save(meta, bad / LIGHTNING_META)
    with pytest.raises(SodaError, match="model.norm.weight holds a NaN or Inf"):
        export_hf(bad, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_sharded_save_refuses_nan_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """The sharded writer's guarantees, in one process: a whole directory appears under its name only at the end;
    a NaN in a shard refuses the save; a failed write is one line and removes the temporary directory."""
    import torch.distributed.checkpoint as dcp

    from soda.train.checkpointing import ShardedCheckpoints

    strategy = ShardedCheckpoints()
    path = tmp_path / "checkpoints" / "step0000002.ckpt"
    good = {"state_dict": {"model.w": torch.ones(4)}, "optimizer_states": [{"state": {}}], "global_step": 2}
    strategy.save_checkpoint(dict(good), path)
    assert {p.name for p in path.iterdir()} >= {DCP_INDEX, LIGHTNING_META} and unreadable_reason(path) is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["step0000002.ckpt"]
    nan = {**good, "state_dict": {"model.w": torch.tensor([1.0, float("nan")])}}
    with pytest.raises(SodaError, match="not saved: state_dict.model.w holds a NaN or Inf"):
        strategy.save_checkpoint(nan, path.with_name("step0000003.ckpt"))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", disk_full)
    with pytest.raises(SodaError, match=r"step0000004.ckpt: cannot write the checkpoint \(No space left on device\); "
                                        "nothing was written"):
        strategy.save_checkpoint(dict(good), path.with_name("step0000004.ckpt"))
    assert sorted(p.name for p in path.parent.iterdir()) == ["step0000002.ckpt"]  # no temporary directory left


@pytest.mark.slow
def test_a_torn_sharded_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(sharded_run, train_tokens,
                                                                                          tmp_path):
    out = tmp_path / "torn"
    shutil.copytree(sharded_run, out, symlinks=True)
    shutil.rmtree(out / "hf")
    (out / "checkpoints" / "step0000006.ckpt" / DCP_INDEX).unlink()  # cut short outside our writes (a copy, a sync)
    assert "torn" in unreadable_reason(out / "checkpoints" / "step0000006.ckpt")
    done = run_cli(fsdp_args(train_tokens, out) + ["--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step0000006.ckpt cannot be read (torn: no .metadata" in done.stderr and "moved aside" in done.stderr
    assert (out / "checkpoints" / "step0000006.ckpt.corrupt").is_dir()
    assert unreadable_reason(out / "checkpoints" / "step0000006.ckpt") is None  # saved again, whole
    got, want = losses(out), losses(sharded_run)
    for step in range(3, 6):  # resumed from step 3 on the same two ranks: the same steps again
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 3])
def test_a_sharded_checkpoint_resumes_on_another_number_of_ranks(sharded_run, train_tokens, tmp_path, devices):
    """Saved on two ranks, resumed on one or three: DCP reshards the weights and optimizer state; the run trains on
    and saves its own sharded checkpoints (one file per rank)."""
    out = tmp_path / f"on{devices}"
    shutil.copytree(sharded_run, out, symlinks=True)
    (out / "checkpoints" / "step0000006.ckpt").rename(out / "checkpoints" / "later")  # resume from step 3
    done = run_cli(fsdp_args(train_tokens, out, devices) + ["--resume", "--no-export"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Restored all states from the checkpoint" in done.stderr
    assert {p.name for p in (out / "checkpoints" / "step0000006.ckpt").glob("*.distcp")} == {
        f"__{r}_0.distcp" for r in range(devices)}
    got = losses(out)
    assert sorted(got) == list(range(6)) and all(torch.isfinite(torch.tensor(v)) for v in got.values())


def _load_on_ranks(rank: int, world: int, port: int, checkpoint: str, result: str) -> None:
    """One rank of `test_dcp_reshards_the_weights_exactly`: the model sharded as SodaModule.configure_model shards
    it, loaded as Lightning's ModelParallelStrategy loads a directory, then gathered whole on rank 0."""
    import torch.distributed as dist
    from lightning.fabric.strategies.model_parallel import _load_checkpoint
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen3Config, Qwen3ForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    meta = torch.load(Path(checkpoint) / LIGHTNING_META, weights_only=True)
    holder = torch.nn.Module()
    holder.model = Qwen3ForCausalLM(Qwen3Config.from_dict(meta["soda"]["model_config"]))
    mesh = init_device_mesh("cpu", (world,))
    for layer in holder.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(holder.model.get_output_embeddings(), mesh=mesh)
    fully_shard(holder.model.model, mesh=mesh)
    _load_checkpoint(Path(checkpoint), {"state_dict": holder})
    full = get_model_state_dict(holder, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, result)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 3])
def test_dcp_reshards_the_weights_exactly(sharded_run, tmp_path, world):
    """Two ranks' shards loaded on one or three ranks give back exactly the weights that were saved."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    step = sharded_run / "checkpoints" / "step0000006.ckpt"
    mp.spawn(_load_on_ranks, args=(world, port, str(step), str(tmp_path / "full.pt")), nprocs=world)
    loaded = torch.load(tmp_path / "full.pt", weights_only=True)
    saved = load_checkpoint(step)["state_dict"]
    assert loaded.keys() == saved.keys()
    for name in saved:
        assert torch.equal(loaded[name], saved[name]), name


@pytest.mark.slow
def test_export_command_for_both_layouts_and_its_errors(sharded_run, train_tokens, tmp_path, capsys):
    from soda.train.cli import main

    assert main(["export", str(sharded_run), "--step", "3"]) == 0
    loaded = load_model(str(sharded_run / "hf-step3"))
    direct = load_model(str(sharded_run / "checkpoints" / "step0000003.ckpt"))  # a sharded step directory loads too
    assert resolve_checkpoint(str(sharded_run / "checkpoints" / "step0000003.ckpt")).is_dir()
    for (name, a), b in zip(loaded.model.state_dict().items(), direct.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.vocab.size == direct.vocab.size and loaded.codec_spec == "mimi:random"
    from soda.finetune.prepare import init_target

    step3 = sharded_run / "checkpoints" / "step0000003.ckpt"
    assert init_target(str(step3), tmp_path) == (str(tmp_path / "init"), step3)  # soda-finetune exports it first

    single = tmp_path / "single"
    assert main(tiny_args(train_tokens, single, steps=4, **{"--ckpt-every": "2", "--workers": "0"})
                + ["--no-export"]) == 0
    assert main(["export", str(single), "--step", "2", "--out", str(tmp_path / "two")]) == 0
    assert load_model(str(tmp_path / "two")).model is not None
    assert export_step(single) == single / "hf"  # the newest step, to RUN/hf
    capsys.readouterr()

    def error(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            main(["export", *argv])
        assert e.value.code == 2
        return capsys.readouterr().err

    assert "no such soda-train run" in error(str(tmp_path / "nothing"))
    assert "--step 5: " in (said := error(str(single), "--step", "5")) and "saved steps: 2, 4" in said
    torn = tmp_path / "torn"
    shutil.copytree(sharded_run / "checkpoints", torn / "checkpoints", symlinks=True)
    (torn / "checkpoints" / "step0000003.ckpt" / LIGHTNING_META).unlink()
    assert "cannot be exported (torn: no meta.pt" in error(str(torn), "--step", "3")
    assert len(error(str(torn), "--step", "3").strip().splitlines()) == 1
    assert "soda-train export" in subprocess.run([PY, "-m", "soda.train", "export", "--help"], capture_output=True,
                                                 text=True).stdout


@pytest.mark.slow
def test_async_checkpoints_hold_the_same_state_and_the_run_waits_for_them(sharded_run, train_tokens, tmp_path):
    """--async-checkpoint: the same sharded checkpoints as a blocking save (a copy taken at the step, written while
    training goes on), whole when the run ends; last.ckpt points at the newest."""
    out = tmp_path / "async"
    done = run_cli(fsdp_args(train_tokens, out, 2, "--async-checkpoint"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").resolve().name == "step0000006.ckpt"
    assert not list((out / "checkpoints").glob(".*"))  # no temporary directory left
    for step in ("step0000003.ckpt", "step0000006.ckpt"):
        a = load_checkpoint(out / "checkpoints" / step)["state_dict"]
        b = load_checkpoint(sharded_run / "checkpoints" / step)["state_dict"]
        for name in a:
            assert torch.equal(a[name], b[name]), (step, name)


def test_async_single_file_checkpoints_equal_blocking_ones(train_tokens, tmp_path):
    from soda.train.cli import main

    args = {"--ckpt-every": "2", "--workers": "0"}
    assert main(tiny_args(train_tokens, tmp_path / "sync", steps=4, **args) + ["--no-export"]) == 0
    assert main(tiny_args(train_tokens, tmp_path / "async", steps=4, **args)
                + ["--no-export", "--async-checkpoint"]) == 0
    assert (tmp_path / "async" / "checkpoints" / "last.ckpt").resolve().name == "step0000004.ckpt"
    for step in ("step0000002.ckpt", "step0000004.ckpt"):
        a, b = (torch.load(tmp_path / run / "checkpoints" / step, weights_only=True) for run in ("sync", "async"))
        for name in a["state_dict"]:
            assert torch.equal(a["state_dict"][name], b["state_dict"][name]), (step, name)
        assert a["global_step"] == b["global_step"]


def test_a_sharded_checkpoint_is_refused_without_fsdp_in_one_line(tmp_path):
    from soda.train.cli import check_checkpoint_layout

    (tmp_path / "checkpoints" / "step0000003.ckpt").mkdir(parents=True)
    with pytest.raises(SodaError, match="sharded \\(FSDP\\) checkpoint; resume with --strategy fsdp"):
        check_checkpoint_layout(tmp_path, "ddp")
    check_checkpoint_layout(tmp_path, "fsdp")


@pytest.mark.slow
def test_sigterm_with_async_sharded_checkpoints_waits_for_a_whole_checkpoint(train_tokens, tmp_path):
    """SIGTERM to the process group of a two-rank FSDP run saving in the background: the run saves the step, waits
    until the directory is whole, points last.ckpt at it and exits 143; --resume finishes the run."""
    import signal
    import time

    out = tmp_path / "preempted"
    args = tiny_args(train_tokens, out, steps=24, **{"--batch-tokens": "1536", "--tokens": str(24 * 1536),
                                                     "--ckpt-every": "4", "--val-every": "100"}) + [
        "--accelerator", "cpu", "--devices", "2", "--strategy", "fsdp", "--async-checkpoint", "--no-export"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([PY, "-m", "soda.train", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    start = time.time()
    while not (out / "checkpoints" / "step0000004.ckpt").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - start < 300
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "checkpoint saved" in err
    last = (out / "checkpoints" / "last.ckpt").resolve()
    assert 4 <= int(last.name.removeprefix("step").removesuffix(".ckpt")) < 24
    assert unreadable_reason(last) is None
    assert not list((out / "checkpoints").glob(".*"))  # no temporary directory left
    done = run_cli(args + ["--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(losses(out)) == list(range(24))


def test_partial_writes_of_killed_saves_are_removed_on_resume(tmp_path, capsys):
    """A kill mid-save leaves `.stepN.ckpt.tmp/` (sharded) or `.stepN.ckpt.*.tmp` (a single file), each up to a whole
    checkpoint's size: a resume removes them, says so, and keeps every checkpoint."""
    from soda.train.cli import resolve_resume

    ckpts = tmp_path / "checkpoints"
    (ckpts / ".step0000006.ckpt.tmp").mkdir(parents=True)
    (ckpts / ".step0000006.ckpt.tmp" / "__0_0.distcp").write_bytes(b"x" * 2048)
    (ckpts / ".step0000009.ckpt.k2j3.tmp").write_bytes(b"y" * 1024)
    torch.save({"state_dict": {}, "global_step": 3}, ckpts / "step0000003.ckpt")
    assert resolve_resume("yes", tmp_path)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step0000003.ckpt"]
    assert "removed 2 partial checkpoint writes left by an interrupted save" in capsys.readouterr().err


def test_last_link_replaces_a_copied_directory(tmp_path):
    """A run copied by a tool that follows links (shutil.copytree, some syncs) holds a full copy of the sharded step
    directory as `last.ckpt`: the next link replaces it."""
    from soda.checkpoints import link_last

    (tmp_path / "step0000006.ckpt").mkdir()
    (tmp_path / "last.ckpt").mkdir()
    (tmp_path / "last.ckpt" / "__0_0.distcp").write_bytes(b"x")
    link_last(tmp_path / "step0000006.ckpt")
    assert (tmp_path / "last.ckpt").is_symlink() and os.readlink(tmp_path / "last.ckpt") == "step0000006.ckpt"
