"""soda-train end to end: the loss falls, exports load, kills and pre-emption resume exactly, DDP, bad input."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_args
from transformers import AutoModelForCausalLM

from soda.train.cli import main
from tokenize_audio.errors import SodaError

PY = sys.executable


def losses(out: Path, key: str = "train/loss") -> dict[int, float]:
    with open(out / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def run_cli(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([PY, "-m", "soda.train", *args], capture_output=True, text=True, env=env, timeout=600,
                          **kw)


@pytest.fixture(scope="module")
def trained(tiny_run):
    """One uninterrupted 40-step run (conftest), shared by the checks below."""
    return tiny_run


def test_loss_falls_and_run_directory_is_complete(trained):
    loss = losses(trained)
    assert sorted(loss)[-1] == 39  # steps are 0-based in the log: 40 optimizer steps
    first = sum(loss[s] for s in range(3)) / 3
    last = sum(loss[s] for s in range(35, 40)) / 5
    assert last < first - 1.0, (first, last)
    val = losses(trained, "val/loss")
    assert len(val) >= 3 and list(val.values())[-1] < list(val.values())[0]
    rows = list(csv.DictReader(open(trained / "metrics.csv")))
    for key in ("train/nll_text", "train/nll_semantic", "train/nll_acoustic_cb7", "lr", "grad_norm", "tokens_per_s",
                "val/bits_per_audio_second"):
        assert any(r.get(key) for r in rows), key
    shares = {name: [float(r[f"data/share_{name}"]) for r in rows if r.get(f"data/share_{name}")]
              for name in ("speech", "text")}  # the mixture actually trained on: --mix speech=0.9,text=0.1
    assert len(shares["text"]) == 40 and all(a + b == pytest.approx(1) for a, b in zip(*shares.values()))
    assert sum(shares["text"]) / 40 == pytest.approx(0.1, abs=0.005)
    assert (trained / "loss.png").stat().st_size > 1000
    assert (trained / "checkpoints" / "last.ckpt").resolve().name == "step0000040.ckpt"
    assert (trained / "config.yaml").is_file() and (trained / "tensorboard").is_dir()
    hparams = yaml.safe_load((trained / "logs" / "version_0" / "hparams.yaml").read_text())
    model = AutoModelForCausalLM.from_pretrained(trained / "hf")
    assert hparams["parameters_total"] == sum(p.numel() for p in model.parameters())
    assert hparams["parameters_non_embedding"] == hparams["parameters_total"] - 2 * model.lm_head.weight.numel()
    assert hparams["size"] == "tiny" and hparams["attention"] == "sdpa" and hparams["flops_per_token"] > 0


def test_lr_follows_wsd_schedule(trained):
    lr = losses(trained, "lr")
    assert lr[0] == pytest.approx(3e-3 / 4)  # warm-up: 4 steps (10% of 40)
    assert lr[3] == pytest.approx(3e-3) and lr[20] == pytest.approx(3e-3)
    assert lr[39] == pytest.approx(3e-3 / 8)  # linear decay to 0 over the last 8 steps


def test_checkpoint_loads_weights_only_and_hf_export_gives_same_logits(trained):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from soda.checkpoints import load_checkpoint

    ckpt = load_checkpoint(trained / "checkpoints" / "last.ckpt")  # weights_only=True inside
    assert ckpt["global_step"] == 40 and "optimizer_states" in ckpt
    hf = AutoModelForCausalLM.from_pretrained(trained / "hf").eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(0))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    from transformers import Qwen3Config, Qwen3ForCausalLM

    ref = Qwen3ForCausalLM(Qwen3Config.from_dict(ckpt["soda"]["model_config"])).eval()
    ref.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ref(ids).logits, atol=1e-6)
    tok = PreTrainedTokenizerFast.from_pretrained(trained / "hf")
    assert len(tok) == hf.config.vocab_size
    assert hf.config.rope_parameters["rope_type"] == "llama3" and not hf.config.tie_word_embeddings


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(trained, train_tokens, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([PY, "-m", "soda.train", *tiny_args(train_tokens, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "checkpoints" / "step0000016.ckpt", proc)
    # Killed as soon as the checkpoint exists: step 15's row must already be on disk (StepMetrics writes it before
    # ModelCheckpoint saves), since the resume starts at step 16 and will not log it again.
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "hf").exists()
    # The kill may land before Lightning points last.ckpt at the new file: the resume must not depend on the link.
    (out / "checkpoints" / "last.ckpt").unlink(missing_ok=True)
    done = run_cli(tiny_args(train_tokens, out) + ["--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    want, got = losses(trained), losses(out)
    assert set(got) == set(want)
    for step in range(16, 40):  # everything after the checkpoint: same data order, same losses
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def test_a_checkpoint_from_before_the_global_data_order_still_resumes(trained, train_tokens, tmp_path):
    """Checkpoints of earlier versions held each rank's stream position in the loader's state (Lightning refuses a
    loader state it has no loader for) and no global position: the run resumes, saying the data order changed."""
    import shutil

    out = tmp_path / "old"
    shutil.copytree(trained, out, ignore=shutil.ignore_patterns("hf", "data_index"))
    for path in (out / "checkpoints").iterdir():
        if path.name != "step0000016.ckpt":
            path.unlink()
    path = out / "checkpoints" / "step0000016.ckpt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["SodaData"]
    ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] = [{"ranks": [{"cursors": [], "pending": []}]}]
    torch.save(ckpt, path)
    done = run_cli(["--out", str(out), "--resume", "--max-steps", "18", "--no-export"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "predates the global data order" in done.stderr
    assert {16, 17} <= set(losses(out))


def test_checkpoints_are_written_beside_their_destination_never_through_tmpdir(train_tokens, tmp_path, monkeypatch):
    """A cluster node's /tmp is often far smaller than a checkpoint (about 70 GB at 4B): a temporary file made
    without a directory (in $TMPDIR) fails with ENOSPC here, as it would there; the run must not need one."""
    import errno
    import tempfile

    real = tempfile.mkstemp

    def node_local_tmp_is_full(*args, **kwargs):
        if kwargs.get("dir") is None and len(args) < 3:
            raise OSError(errno.ENOSPC, "No space left on device (the node-local $TMPDIR)")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", node_local_tmp_is_full)
    out = tmp_path / "run"
    assert main(tiny_args(train_tokens, out, steps=4, **{"--ckpt-every": "2", "--workers": "0"})
                + ["--no-export"]) == 0
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"]  # no temporary or last-v1 files left
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_resume_auto_starts_a_new_run_and_continues_an_interrupted_one(trained, train_tokens, tmp_path):
    """One command line for a job's first start and its re-queued restarts: the second call continues the first
    run (the same losses as the uninterrupted run), it is not refused as "already holds a run"."""
    out = tmp_path / "auto"
    assert main(tiny_args(train_tokens, out, **{"--max-steps": "9"}) + ["--resume", "auto", "--no-export"]) == 0
    assert main(tiny_args(train_tokens, out, **{"--max-steps": "12"}) + ["--resume", "auto", "--no-export"]) == 0
    got, want = losses(out), losses(trained)
    assert sorted(got) == list(range(12))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def test_resume_takes_the_highest_step_file_not_a_stale_last_link(tmp_path):
    from soda.checkpoints import last_checkpoint, link_last

    ckpts = tmp_path / "checkpoints"
    assert last_checkpoint(tmp_path) is None
    ckpts.mkdir()
    for name in ("step0000016.ckpt", "step0000100.ckpt", "step0000024.ckpt", "stepx.ckpt", ".step0000200.ckpt.tmp1"):
        (ckpts / name).write_bytes(b"")
    link_last(ckpts / "step0000024.ckpt")  # a kill left the link one save behind
    assert last_checkpoint(tmp_path) == ckpts / "step0000100.ckpt"
    for path in ckpts.glob("step0*.ckpt"):
        path.unlink()
    (ckpts / "last.ckpt").unlink()
    (ckpts / "last.ckpt").write_bytes(b"")  # a copied (not linked) last.ckpt, the only checkpoint left
    assert last_checkpoint(tmp_path) == ckpts / "last.ckpt"


PREEMPT_EXTRA = {"--micro-batch": "4", "--ckpt-every": "100", "--workers": "2"}  # loader workers, as by default


@pytest.fixture(scope="module")
def preempt_reference(train_tokens, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preempt") / "reference"
    assert main(tiny_args(train_tokens, out, steps=20, **PREEMPT_EXTRA) + ["--no-export"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("target,sig,code", [("process", signal.SIGTERM, 143), ("group", signal.SIGTERM, 143),
                                             ("group", signal.SIGUSR1, 143), ("group", signal.SIGINT, 130)])
def test_a_signal_checkpoints_at_a_step_boundary_and_resumes(preempt_reference, train_tokens, tmp_path, target, sig,
                                                             code):
    """SIGTERM as a scheduler sends it: to the main process, or to the whole process group (SLURM at a time limit,
    `timeout`, `kill -- -PGID`), data-loader workers included; SIGUSR1 (`#SBATCH --signal=USR1@120`), and Ctrl-C
    (SIGINT to the terminal's group). The workers must outlive the checkpoint: the run saves at the end of the
    current optimizer step (micro-batch 4 with 2 accumulation steps: never half an accumulation), exits 143 (the
    code job scripts requeue on; 130 for Ctrl-C), and --resume trains exactly
    the uninterrupted run's remaining steps."""
    out = tmp_path / "preempted"
    args = tiny_args(train_tokens, out, steps=20, **PREEMPT_EXTRA)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([PY, "-m", "soda.train", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "logs" / "version_0" / "metrics.csv"
    _wait_for(metrics, proc)
    if target == "group":
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and "killed by signal" not in err, err[-2000:]
    assert "checkpoint saved" in err and "--resume" in err
    step = int((out / "checkpoints" / "last.ckpt").resolve().stem.removeprefix("step"))
    assert 0 < step < 20
    assert not list((out / "checkpoints").glob("last-v*"))  # no duplicate full-size copies beside the link
    done = run_cli(args + ["--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list((out / "checkpoints").glob("last-v*"))
    want, got = losses(preempt_reference), losses(out)
    assert set(got) == set(want) == set(range(20))
    for s in range(20):
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), s


def ddp_args(train_tokens, out: Path) -> list[str]:
    return tiny_args(train_tokens, out, steps=6, **{"--ckpt-every": "3", "--val-every": "3"}) + [
        "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]


@pytest.fixture(scope="module")
def ddp_run(train_tokens, tmp_path_factory) -> Path:
    """Two CPU processes (gloo) that Lightning launches itself."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = run_cli(ddp_args(train_tokens, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 devices x 4 sequences" in done.stderr
    return out


@pytest.mark.slow
def test_two_process_ddp_on_cpu(ddp_run):
    assert sorted(losses(ddp_run)) == list(range(6))
    assert (ddp_run / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_ddp_stop_and_resume_continues_the_data_exactly_on_any_number_of_ranks(ddp_run, train_tokens, tmp_path):
    """The data order is global (the checkpoint holds the step and each source's window count, not each rank's
    stream), so a two-process run stopped at step 3 and resumed on two processes, or on one, trains exactly the
    uninterrupted run's steps 3-5: the same windows (data/windows_digest) and the same losses."""
    import shutil

    out = tmp_path / "stopped"
    done = run_cli(ddp_args(train_tokens, out) + ["--max-steps", "3", "--no-export"])
    assert done.returncode == 0, done.stderr[-3000:]
    other = tmp_path / "one-rank"
    shutil.copytree(out, other)
    for run, devices in ((out, "2"), (other, "1")):
        done = run_cli(["--out", str(run), "--resume", "--devices", devices, "--max-steps", "6", "--no-export"])
        assert done.returncode == 0, done.stderr[-3000:]
        for key in ("train/loss", "data/windows_digest"):
            got, want = losses(run, key), losses(ddp_run, key)
            assert sorted(got) == sorted(want) == list(range(6)), (devices, key)
            for step in want:
                assert got[step] == pytest.approx(want[step], rel=1e-5), (devices, key, step)


@pytest.mark.slow
def test_fsdp_on_cpu_trains_exactly_like_ddp_and_resumes(ddp_run, train_tokens, tmp_path):
    """--strategy fsdp (FSDP2: every decoder layer, the LM head and the rest sharded over the two ranks; gloo on
    the CPU): the same losses, gradient norms and validation as DDP; stopped and resumed from its sharded
    checkpoint it still matches; the export is a whole model."""
    from soda.checkpoints import load_checkpoint

    out = tmp_path / "fsdp"
    args = [a if a != "ddp" else "fsdp" for a in ddp_args(train_tokens, out)]
    done = run_cli(args + ["--max-steps", "3"])
    assert done.returncode == 0, done.stderr[-3000:]
    vocab_size = AutoModelForCausalLM.from_pretrained(ddp_run / "hf").config.vocab_size
    assert load_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"]["model.lm_head.weight"].shape[0] == vocab_size
    done = run_cli(args + ["--resume", "--max-steps", "6"])
    assert done.returncode == 0, done.stderr[-3000:]
    for key in ("train/loss", "grad_norm", "val/loss"):
        got, want = losses(out, key), losses(ddp_run, key)
        assert sorted(got) == sorted(want) and want, key
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-5), (key, step)
    ours, theirs = (AutoModelForCausalLM.from_pretrained(d / "hf") for d in (out, ddp_run))
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        # atol 1e-5: sharded and replicated gradients are summed in another order, and an embedding row that got a
        # near-zero gradient moves by Adam's sign-like step (eps 1e-16), so a few such entries differ by ~6e-6
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_fsdp_stopped_on_two_ranks_resumes_exactly_on_three_and_on_one(train_tokens, tmp_path):
    """A requeued job landing on another number of GPUs: an FSDP run of 6 steps (6 windows a step) stopped at step 3
    on 2 ranks and resumed on 3 ranks, or on 1, trains the uninterrupted run's steps: the same windows at every step
    (data/windows_digest), the same losses within float tolerance (the ranks' shares are summed in another order)."""
    import shutil

    def args(out, devices):
        return tiny_args(train_tokens, out, steps=6, **{"--batch-tokens": "768", "--tokens": "4608", "--micro-batch": "1",
                                                        "--ckpt-every": "3", "--val-every": "3"}) + [
            "--accelerator", "cpu", "--devices", devices, "--strategy", "fsdp", "--no-export"]

    straight = tmp_path / "straight"
    done = run_cli(args(straight, "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    stopped = tmp_path / "stopped"
    done = run_cli(args(stopped, "2") + ["--max-steps", "3"])
    assert done.returncode == 0, done.stderr[-3000:]
    for devices in ("3", "1"):
        run = tmp_path / f"on{devices}"
        shutil.copytree(stopped, run)  # as copytree copies: last.ckpt becomes a copy of the sharded step directory
        done = run_cli(["--out", str(run), "--resume", "--devices", devices, "--max-steps", "6"])
        assert done.returncode == 0, "\n".join([line for line in done.stderr.splitlines() if "rror" in line][:10]
                                               + [done.stderr[-2000:]])
        assert f"{devices} devices x 1 sequences" in done.stderr or devices == "1"
        assert not list((run / "checkpoints").glob("*-v*"))  # the step it resumed at is not saved again
        for key in ("data/windows_digest", "train/loss", "val/loss"):
            got, want = losses(run, key), losses(straight, key)
            assert sorted(got) == sorted(want) and want, (devices, key, got, want)
            for step in want:
                assert got[step] == pytest.approx(want[step], rel=1e-5 if key != "data/windows_digest" else 0), (
                    devices, key, step)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_ddp_under_torchrun_and_slurm_matches_lightnings_own_launch(ddp_run, train_tokens, tmp_path, launcher):
    """The ranks come from the launcher, as on a cluster: torchrun's environment, or SLURM's (two tasks started as
    srun would, with SLURM_* variables). Same data split, same losses as the run Lightning launched itself."""
    out = tmp_path / "launched"
    args = ddp_args(train_tokens, out) + ["--no-export"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    if launcher == "torchrun":
        procs = [subprocess.Popen([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                   "-m", "soda.train", *args], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)]
    else:
        slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
                 "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "soda", "SLURM_NODELIST": "localhost"}
        procs = [subprocess.Popen([PY, "-m", "soda.train", *args],
                                  env={**env, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    assert "2 devices x 4 sequences" in logs[0]
    if launcher == "slurm":  # each task is its rank (had Lightning not seen SLURM, task 0 would spawn rank 1 itself)
        for r, log in enumerate(logs):
            assert f"GLOBAL_RANK: {r}, MEMBER: {r + 1}/2" in log and f"GLOBAL_RANK: {1 - r}," not in log, log[-2000:]
    got, want = losses(out), losses(ddp_run)
    assert sorted(got) == sorted(want) == list(range(6))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


# --- bad input -----------------------------------------------------------------------------------
def _error(capsys, args) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("soda-train: error: "), err
    return last


def test_existing_run_needs_resume_and_resume_refuses_other_settings(trained, capsys):
    assert "already holds a run" in _error(capsys, ["--out", str(trained), "--size", "tiny", "--data", "x"])
    err = _error(capsys, ["--out", str(trained), "--resume", "--size", "135m"])
    assert "size" in err and "differ" in err


def test_missing_and_corrupt_shards_are_named(train_tokens, tmp_path, capsys):
    import shutil

    data = tmp_path / "tokens"
    shutil.copytree(train_tokens, data)
    shard = data / "train-speech-00000.tar"
    shard.rename(tmp_path / "moved.tar")
    err = _error(capsys, tiny_args(data, tmp_path / "a", steps=2))
    assert "train-speech-00000.tar" in err and "missing" in err
    (tmp_path / "moved.tar").rename(shard)
    shard.write_bytes(shard.read_bytes()[:3000] + b"\x00garbage" * 500)
    err = _error(capsys, tiny_args(data, tmp_path / "b", steps=2))
    assert "train-speech-00000.tar" in err and "unreadable" in err


def test_data_without_validation_shards_is_said_at_start(small_corpus, tmp_path, capsys):
    from tokenize_audio.cli import main as tokenize_main

    tokens = tmp_path / "tokens"
    assert tokenize_main([str(small_corpus), "--out", str(tokens), "--codec", "mimi:random", "--text-tokenizer",
                          "bytes", "--validation-fraction", "0", "--quiet"]) == 0
    capsys.readouterr()
    args = tiny_args(tokens, tmp_path / "run", steps=1, **{"--no-export": ""})
    assert main(args[: args.index("--data", args.index("--data") + 1)]) == 0  # speech only
    assert "no validation shards: this run will report no validation loss" in capsys.readouterr().err


def test_abbreviated_flags_are_refused(train_tokens, tmp_path, capsys):
    """argparse would read --max-st as --max-steps: a sweep's reserved-flag check and a reader of the command line
    would not see it."""
    with pytest.raises(SystemExit) as exc:
        main(tiny_args(train_tokens, tmp_path / "run", steps=2) + ["--max-st", "1"])
    assert exc.value.code == 2 and "unrecognized arguments: --max-st 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bad_flags_are_one_line_errors(train_tokens, tmp_path, capsys):
    assert "--tokens" in _error(capsys, tiny_args(train_tokens, tmp_path / "a", **{"--tokens": "lots"}))
    assert "unknown --size" in _error(capsys, tiny_args(train_tokens, tmp_path / "b", **{"--size": "huge"}))
    assert "--micro-batch 3" in _error(capsys, tiny_args(train_tokens, tmp_path / "c", **{"--micro-batch": "3"}))
    assert "--mix" in _error(capsys, tiny_args(train_tokens, tmp_path / "d") + ["--mix", "speech=1,music=2"])
    assert "not found" in _error(capsys, ["--config", str(tmp_path / "none.yaml")])
    if not torch.cuda.is_available():
        args = tiny_args(train_tokens, tmp_path / "g", **{"--attention": "flex_attention"})
        assert "no flex attention backward on the CPU" in _error(capsys, args)
        assert not (tmp_path / "g" / "config.yaml").exists()  # a refused start leaves no run behind
    assert "Lightning refused" in _error(capsys, tiny_args(train_tokens, tmp_path / "f", **{"--strategy": "nope"}))
    # nonsense values are refused before anything starts: a negative clip would flip every gradient, a zero
    # interval would divide by zero mid-run, an unknown attention kernel would be a transformers traceback
    for flag, value, said in [("--devices", "0", "--devices '0': give a count of at least 1"),
                              ("--num-nodes", "0", "--num-nodes 0: must be at least 1"),
                              ("--micro-batch", "0", "--micro-batch 0: must be at least 1"),
                              ("--val-every", "0", "--val-every 0: must be at least 1"),
                              ("--workers", "-1", "--workers -1: must be at least 0"),
                              ("--grad-clip", "-1", "--grad-clip -1.0: must be at least 0"),
                              ("--lr", "-1", "--lr -1.0: must be positive"),
                              ("--width", "0", "--width 0: must be at least 1"),
                              ("--attention", "nope", "--attention nope: transformers cannot use it")]:
        out = tmp_path / f"bad{flag}"
        assert said in _error(capsys, tiny_args(train_tokens, out, **{flag: value})), flag
        assert not (out / "checkpoints").exists(), flag
    assert "--mfu 0.0: give a fraction" in _error(capsys, ["--size", "1b", "--dry-run", "--mfu", "0"])


@pytest.mark.parametrize("argv,named", [(["--size", "1b", "--tokens", "500B"], "--size 1b"),
                                        (["--size", "600m"], "--size 600m"),
                                        (["--size", "tiny", "--tokens", "500B"], "--tokens 500B"),
                                        (["--sweep-width", "768"], "--sweep-width 768"),
                                        (["--config", "configs/soda-1b.yaml"], "--size 1b")])
def test_a_real_run_without_data_prints_its_plan_and_trains_nothing(argv, named, tmp_path, capsys, monkeypatch):
    """The README's headline command without --data: the plan of what was asked for (SODA's sequence length and
    batch, not the demo's), then one line on how to give data; exit code 2, no run directory, no demo tokenized."""
    import soda.train.cli

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr(soda.train.cli, "train", lambda *a, **kw: pytest.fail("trained without data"))
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(argv + ["--out", str(out)]) == 2
    plan, err = capsys.readouterr()
    assert "steps of 512 x 4096 = 2,097,152 tokens" in plan and "FLOPs per token" in plan
    assert f"{named} without --data: nothing was trained" in err and "soda-tokenize" in err and "--data" in err
    assert not out.exists()


def test_plain_soda_train_is_the_demo_under_the_users_own_settings(tmp_path, monkeypatch):
    """No --data and nothing beyond the demo: the demo's settings, with every flag the user gave kept."""
    import soda.train.cli

    runs = []
    monkeypatch.setattr(soda.train.cli, "train", lambda cfg, resume: runs.append(cfg) or 0)
    assert main(["--out", str(tmp_path / "a")]) == 0
    assert main(["--out", str(tmp_path / "b"), "--seq-len", "128", "--lr", "0.01", "--size", "tiny",
                 "--mix", "speech=0.5,text=0.5"]) == 0
    demo, mine = runs
    assert (demo.size, demo.seq_len, demo.lr, demo.mix) == ("tiny", 256, 0.003, {"speech": 0.95, "text": 0.05})
    assert (mine.size, mine.seq_len, mine.lr, mine.mix) == ("tiny", 128, 0.01, {"speech": 0.5, "text": 0.5})
    assert mine.tokens == demo.tokens == 409600


def test_weight_decay_mode_is_recorded_and_old_runs_resume_with_their_own(tmp_path, capsys):
    from soda.train.cli import resolve_config

    assert main(["--size", "135m", "--dry-run"]) == 0
    assert "weight decay 0.033 (adamc)" in capsys.readouterr().out
    assert main(["--size", "135m", "--dry-run", "--weight-decay-mode", "adamw"]) == 0
    assert "weight decay 0.033 (adamw)" in capsys.readouterr().out
    cfg = resolve_config({"weight_decay_mode": "adamw"}, tmp_path / "new", False, None, [])
    assert cfg.to_dict()["weight_decay_mode"] == "adamw"
    old = tmp_path / "old"  # a run saved before the setting existed was trained with plain decoupled decay
    old.mkdir()
    (old / "config.yaml").write_text(yaml.safe_dump({"size": "tiny", "data": ["x"]}))
    assert resolve_config({}, old, True, None, []).weight_decay_mode == "adamw"


def test_yaml_settings_are_read_as_their_types_or_refused_by_name(tmp_path):
    from soda.train.config import make_config

    cfg = make_config({"lr": "3e-4", "seq_len": "128", "micro_batch": 8.0, "betas": ["0.9", 0.95]})
    assert (cfg.lr, cfg.seq_len, cfg.micro_batch, cfg.betas) == (3e-4, 128, 8, (0.9, 0.95))  # YAML: lr: 3e-4 is a str
    for bad, said in [({"lr": "fast"}, "setting lr: 'fast' is not a number"),
                      ({"seq_len": 12.5}, "setting seq_len: 12.5 is not a whole number"),
                      ({"cautious": "maybe"}, "setting cautious: 'maybe' is not true or false"),
                      ({"betas": [0.9]}, "betas [0.9]: give two numbers in [0, 1)")]:
        with pytest.raises(SodaError, match=re.escape(said)):
            make_config(bad)


def test_init_from_with_another_vocabulary_is_refused(trained, tmp_path, capsys):
    from tokenize_audio.cli import main as tokenize_main

    other = tmp_path / "other"
    tokenize_main([str(Path(__file__).parents[1] / "demo" / "corpus" / "text" / "kjv_proverbs.txt"), "--out",
                   str(other), "--codec", "mimi:random", "--codebooks", "4", "--text-tokenizer", "bytes", "--quiet"])
    capsys.readouterr()
    err = _error(capsys, ["--out", str(tmp_path / "run"), "--init-from", str(trained / "hf"), "--data", str(other),
                          "--tokens", "10K"])
    assert "vocabulary" in err and "--init-from" in err


def test_training_from_a_model_holding_nan_is_refused(trained, train_tokens, tmp_path, capsys):
    """A diverged model's export (e.g. from before this check existed) is no start: every step would be skipped."""
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(trained / "hf")
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    capsys.readouterr()
    for extra in ({}, {"--on-nonfinite": "skip"}):
        args = tiny_args(train_tokens, tmp_path / "run", steps=3, **{"--size": None, "--init-from": str(broken),
                                                                     **extra})
        err = _error(capsys, args)
        assert "lm_head.weight holds a NaN or Inf; a model that diverged cannot be trained from" in err
    assert not list(tmp_path.glob("run/checkpoints/*"))


def test_inference_loader_finds_model_vocabulary_and_codec(trained):
    from soda.checkpoints import load_model

    from_run, from_ckpt = load_model(str(trained), device="cpu"), load_model(str(trained / "checkpoints" / "last.ckpt"),
                                                                            device="cpu")
    assert from_run.codec_spec == from_ckpt.codec_spec == "mimi:random" and "RANDOM" in from_run.codec_label
    assert from_run.vocab.matches(from_ckpt.vocab)
    ids = torch.arange(40).unsqueeze(0) * 97 % from_run.vocab.size
    with torch.no_grad():
        assert torch.allclose(from_run.model(ids).logits, from_ckpt.model(ids).logits, atol=1e-5)
    # weights=False (fine-tuning's data preparation): the same vocabulary and codec, no model
    for source, full in ((trained, from_run), (trained / "checkpoints" / "last.ckpt", from_ckpt)):
        light = load_model(str(source), device="cpu", weights=False)
        assert light.model is None and light.vocab.matches(full.vocab)
        assert (light.codec_spec, light.codec_label) == (full.codec_spec, full.codec_label)


def test_compile_and_activation_checkpointing_train_the_same_model(trained, train_tokens, tmp_path, capsys):
    """--compile (each decoder layer and the loss's chunk arithmetic through torch.compile) with
    --activation-checkpointing (layers recomputed in the backward pass): the same losses as the plain run, and
    checkpoints and exports keep their plain keys (compiled in place)."""
    out = tmp_path / "compiled"
    assert main(tiny_args(train_tokens, out, **{"--max-steps": "5", "--compile": "", "--log-every": "2",
                                                "--activation-checkpointing": ""})) == 0
    assert "torch.compile (layers and loss), activation checkpointing" in capsys.readouterr().err
    want, got = losses(trained), losses(out)
    assert sorted(got) == [1, 3, 4]  # every 2nd step, and the last
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-4), step
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert "model.model.layers.0.self_attn.q_proj.weight" in state and not any("_orig_mod" in k for k in state)


def test_step_row_is_that_steps_loss_and_gradient_norm(trained):
    """Row 0 of metrics.csv recomputed outside Lightning: the first batch's loss through the same model, and the
    norm of its accumulated gradient (before clipping) — the step's own, not the previous step's."""
    from soda.train.config import load_yaml, make_config
    from soda.train.datamodule import training_loader
    from soda.train.loss import lm_loss
    from soda.train.sources import resolve_sources
    from soda.train.plan import batch_layout
    from soda.train.run import model_for_run

    cfg = make_config(load_yaml(trained / "config.yaml"))
    sources, vocab = resolve_sources(cfg.data, cfg.val_data, cfg.mix, cfg.vocab)
    micro, accumulate = batch_layout(cfg, 1)
    model, _ = model_for_run(cfg, vocab)
    batches = iter(training_loader(sources, cfg.seq_len, cfg.seed, micro, 0, trained / "data_index", vocab.size,
                                   accumulate=accumulate))
    total = 0.0
    for _ in range(accumulate):
        loss = lm_loss(model, next(batches), cfg.z_loss)[0]
        (loss / accumulate).backward()
        total += loss.item() / accumulate
    norm = torch.stack([p.grad.pow(2).sum() for p in model.parameters()]).sum().sqrt().item()
    row = next(r for r in csv.DictReader(open(trained / "metrics.csv")) if r["step"] == "0")
    assert float(row["train/loss"]) == pytest.approx(total, rel=1e-5)
    assert float(row["grad_norm"]) == pytest.approx(norm, rel=1e-6)


@pytest.mark.slow
def test_wandb_logging_offline(train_tokens, tmp_path):
    """--wandb PROJECT adds Lightning's WandbLogger; offline (WANDB_MODE=offline, no account, no network) the run
    is written under OUT/wandb with the step metrics and the model's size, ready for `wandb sync`."""
    pytest.importorskip("wandb")
    out = tmp_path / "wb"
    done = run_cli(tiny_args(train_tokens, out, **{"--max-steps": "3", "--wandb": "soda-test"}) + ["--no-export"],
                   env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    for key in (b"train/loss", b"grad_norm", b"tokens_per_s", b"parameters_non_embedding"):
        assert key in data, key
    run_id = (out / "wandb_run_id").read_text()
    assert runs[0].name == f"run-{run_id}.wandb"
    done = run_cli(tiny_args(train_tokens, out, **{"--max-steps": "5", "--wandb": "soda-test"}) + ["--no-export",
                   "--resume"], env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in (out / "wandb").glob("offline-run-*/run-*.wandb")} == {f"run-{run_id}.wandb"}


def test_bf16_mixed_precision_runs_the_gpu_code_path(trained, train_tokens, tmp_path):
    """bf16-mixed (the GPU default) on the CPU: autocast through the model and the chunked loss (head in bf16, softmax
    in fp32, fp32 master weights); the first steps' losses stay within 1% of the fp32 run's."""
    out = tmp_path / "bf16"
    assert main(tiny_args(train_tokens, out, **{"--max-steps": "4", "--precision": "bf16-mixed"}) + ["--no-export"]) == 0
    got, want = losses(out), losses(trained)
    assert sorted(got) == [0, 1, 2, 3]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-2), step
    assert any(got[s] != want[s] for s in got)  # it did run in bf16
