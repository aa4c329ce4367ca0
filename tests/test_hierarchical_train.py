"""soda-train --architecture hierarchical: trains on the same shards (loss falls, the NLL vector is logged), resumes
exactly, records its architecture, weighs its loss by --loss-weights without touching the NLL vector (either family),
starts from a hierarchical export, run directory or checkpoint (--init-from; a model of the other family or
vocabulary refused in one line), trains under DDP and FSDP (sharded checkpoints, resume, export) and with --compile,
and refuses what it cannot do yet in one line (flex attention). Its windows are steps, read exactly. Its export and
generation: tests/test_hierarchical_export.py; its training-time samples: tests/test_samples.py."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_args

from soda.train.cli import main

HIER = ["--architecture", "hierarchical"]
STEPS = 12


def losses(out: Path, key: str = "train/loss") -> dict[int, float]:
    with open(out / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def hier_args(data: Path, out: Path, **extra) -> list[str]:
    extra = {"--ckpt-every": "4", "--val-every": "6", "--val-batches": "1", "--workers": "0", **extra}
    return tiny_args(data, out, steps=STEPS, **extra) + HIER


@pytest.fixture(scope="module")
def hier_run(train_tokens, tmp_path_factory) -> Path:
    """12 uninterrupted steps of the tiny hierarchical model on the small demo shards (speech and text mixed)."""
    out = tmp_path_factory.mktemp("hier") / "full"
    assert main(hier_args(train_tokens, out)) == 0
    return out


def test_hierarchical_run_trains_logs_the_nll_vector_and_records_its_architecture(hier_run, capsys):
    loss = losses(hier_run)
    assert sorted(loss) == list(range(STEPS))
    first, last = sum(loss[s] for s in range(3)) / 3, sum(loss[s] for s in range(STEPS - 4, STEPS)) / 4
    assert last < first - 0.5, (first, last)
    rows = list(csv.DictReader(open(hier_run / "metrics.csv")))
    for key in ("train/nll_text", "train/nll_special", "train/nll_semantic", "train/nll_acoustic_cb1",
                "train/nll_acoustic_cb7", "val/loss", "val/nll_acoustic_cb7", "grad_norm", "tokens_per_s"):
        assert any(r.get(key) for r in rows), key
    saved = yaml.safe_load((hier_run / "config.yaml").read_text())
    assert saved["architecture"] == "hierarchical" and saved["loss_weights"] == "uniform"
    assert (hier_run / "hf" / "config.json").is_file()  # the family's export (tests/test_hierarchical_export.py)
    ckpt = torch.load(hier_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["soda"]["architecture"] == "hierarchical" and "model_config" not in ckpt["soda"]
    hparams = yaml.safe_load((hier_run / "logs" / "version_0" / "hparams.yaml").read_text())
    assert hparams["parameters_total"] == sum(v.numel() for k, v in ckpt["state_dict"].items())


def test_windows_are_seq_len_steps_and_cover_the_stream_exactly_once(train_tokens, tmp_path, monkeypatch):
    """Windows count steps: read in order, an epoch's windows are every document's steps (`regroup` of the whole
    document) exactly once, `seq_len` steps each, documents numbered within the window; a piece that starts past
    a document's first step mark is read from that mark (a small mark here, so documents hold several)."""
    import numpy as np

    import soda.train.data as data
    import soda.train.index as index
    from soda.hierarchical import regroup
    from soda.train.sources import resolve_sources
    from tokenize_audio.shards import shard_documents

    monkeypatch.setattr(index, "STEP_MARK", 16)
    monkeypatch.setattr(data, "STEP_MARK", 16)
    sources, vocab = resolve_sources([f"speech={train_tokens}"], [], {}, None)
    (stream,), _ = index.index_sources(sources, tmp_path / "index")
    (steps,) = index.index_steps([stream], vocab, tmp_path / "index")
    expected = np.concatenate([regroup(ids, vocab).codes for shard in stream.paths
                               for _, ids in shard_documents(shard, vocab_size=vocab.size)])
    assert steps.total == len(expected) < stream.total and steps.dropped == 0
    assert max(np.load(s).max() for s in steps.steps) > 3 * 16  # documents span several marks
    seq_len = 40
    reader = data.reader_for(steps, seq_len, 0, False, vocab.size, None)
    windows = [reader.window(k) for k in range(steps.total // seq_len)]
    assert all(codes.shape == (seq_len, vocab.n_codebooks) and len(docs) == seq_len for codes, docs, _ in windows)
    assert np.array_equal(np.concatenate([codes for codes, _, _ in windows]), expected[:len(windows) * seq_len])
    assert all(docs[0] == 0 and set(np.diff(docs)) <= {0, 1} for _, docs, _ in windows)
    # shuffled (training), an epoch's windows are the same windows in another order
    shuffled = data.reader_for(steps, seq_len, 3, True, vocab.size, None)
    assert shuffled.block == len(windows)
    mixed = [shuffled.window(k)[0].tobytes() for k in range(len(windows))]
    assert mixed != [codes.tobytes() for codes, _, _ in windows]
    assert sorted(mixed) == sorted(codes.tobytes() for codes, _, _ in windows)


def test_a_document_with_a_cut_frame_is_read_exactly_and_its_stray_ids_counted(train_tokens, tmp_path, monkeypatch):
    """A frame cut short inside a document (its stray audio ids belong to no step) makes a piece span more flat ids
    than K a step: the reader then reads on to the document's end, and the windows are still exactly its steps."""
    import numpy as np

    import soda.train.data as data
    import soda.train.index as index
    from soda.hierarchical import regroup
    from soda.train.sources import resolve_sources
    from tokenize_audio.shards import write_shard
    from tokenize_audio.vocab import Vocabulary

    monkeypatch.setattr(index, "STEP_MARK", 8)
    monkeypatch.setattr(data, "STEP_MARK", 8)
    vocab = Vocabulary.load(train_tokens)
    rng = np.random.default_rng(0)
    frame = lambda: [vocab.audio_base + k * vocab.codebook_size + int(rng.integers(vocab.codebook_size))  # noqa: E731
                     for k in range(vocab.n_codebooks)]
    docs = []
    for d in range(3):
        frames = [frame() for _ in range(30)]
        frames[10] = frames[10][:3]  # cut short: 3 stray ids
        text = list(rng.integers(0, vocab.text_size, 5 + d))
        docs.append(np.array([vocab.bos_id, vocab.text_start, *text, vocab.text_end, vocab.audio_start,
                              *sum(frames, []), vocab.audio_end, vocab.eos_id], np.uint32))
    write_shard(tmp_path / "train-speech-00000.tar", [(f"d{i}", d, {}) for i, d in enumerate(docs)])
    sources, _ = resolve_sources([str(tmp_path / "train-speech-*.tar")], [], {}, str(train_tokens))
    (stream,), _ = index.index_sources(sources, tmp_path / "index")
    (steps,) = index.index_steps([stream], vocab, tmp_path / "index")
    expected = np.concatenate([regroup(d.astype(np.int64), vocab).codes for d in docs])
    assert steps.total == len(expected) and steps.dropped == 3 * 3
    reader = data.reader_for(steps, 12, 0, False, vocab.size, None)
    got = np.concatenate([reader.window(k)[0] for k in range(steps.total // 12)])
    assert np.array_equal(got, expected[:len(got)])


def test_without_mix_the_sources_are_weighed_by_their_steps(train_tokens, tmp_path, capsys):
    """The default mixture is by size: in steps for this family (speech has 8 flat tokens a frame, text 1 a step)."""
    from soda.train.datamodule import SodaData
    from soda.train.sources import resolve_sources

    sources, vocab = resolve_sources([f"speech={train_tokens}", f"text={train_tokens}"], [], {}, None)
    by_tokens = {s.name: s.weight for s in sources}
    data = SodaData(sources, 128, 0, 8, 8, 1, 0, tmp_path, steps_vocab=vocab)
    data.prepare_data()  # rank zero: indexes and says so
    data.setup("fit")
    steps = {s.name: st.total for s, st in zip(sources, data.train_streams)}
    assert {s.name: s.weight for s in sources} == pytest.approx({k: v / sum(steps.values()) for k, v in steps.items()})
    assert sources[0].weight < by_tokens["speech"]
    assert list(data.mixture.weights) == [s.weight for s in sources]
    assert "mixture by steps (no --mix): speech" in capsys.readouterr().err


def test_a_checkpoint_whose_windows_counted_flat_tokens_is_refused_on_resume(train_tokens, tmp_path):
    from soda.train.datamodule import SodaData
    from soda.train.sources import resolve_sources
    from tokenize_audio.errors import SodaError

    sources, vocab = resolve_sources([str(train_tokens)], [], {}, None)
    data = SodaData(sources, 128, 0, 8, 8, 1, 0, tmp_path, steps_vocab=vocab)
    with pytest.raises(SodaError, match="the checkpoint's windows count tokens, this run's count steps"):
        data.load_state_dict({"order": "global", "step": 4, "counts": [32], "batch": 8, "seq_len": 1024})


def test_parameters_and_flops_come_from_the_hierarchical_accounting(hier_run, train_tokens):
    from soda.shape import hierarchical_params
    from soda.train.cli import resolve_config
    from soda.train.plan import flops_per_token_of
    from soda.train.run import model_for_run
    from soda.train.sources import resolve_sources

    cfg = resolve_config({}, hier_run, True, None, [])
    vocab = resolve_sources(cfg.data, cfg.val_data, cfg.mix, cfg.vocab)[1]
    model, shape = model_for_run(cfg, vocab)
    assert sum(p.numel() for p in model.parameters()) == hierarchical_params(shape)
    hparams = yaml.safe_load((hier_run / "logs" / "version_0" / "hparams.yaml").read_text())
    assert hparams["parameters_total"] == hierarchical_params(shape)
    assert hparams["flops_per_token"] == pytest.approx(flops_per_token_of(cfg, shape)) and hparams["flops_per_token"]


def test_stopped_and_resumed_hierarchical_run_ends_with_the_same_weights(hier_run, train_tokens, tmp_path):
    """Stopped at step 5 (between checkpoints, mid-schedule), resumed to the end: the same losses at every step and,
    at step 12, bit-identical weights and optimizer state as the uninterrupted run."""
    out = tmp_path / "resumed"
    assert main(hier_args(train_tokens, out, **{"--max-steps": "5"}) + ["--no-export"]) == 0
    assert main(hier_args(train_tokens, out, **{"--max-steps": str(STEPS)}) + ["--resume"]) == 0
    want, got = losses(hier_run), losses(out)
    assert sorted(got) == list(range(STEPS))
    for step in range(5, STEPS):
        assert got[step] == want[step], step
    a = torch.load(hier_run / "checkpoints" / f"step{STEPS:07d}.ckpt", weights_only=True)
    b = torch.load(out / "checkpoints" / f"step{STEPS:07d}.ckpt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), name
    moments = lambda c: [t for s in c["optimizer_states"][0]["state"].values() for t in s.values()]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(moments(a), moments(b)))


def _mixed_windows(vocab, n: int = 4, length: int = 88, seed: int = 0) -> list[dict]:
    """Windows of text, markers and audio frames (two documents each, cut mid-frame at the end)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        ids, docs = [], []
        for doc in range(2):
            text = torch.randint(0, vocab.text_size, (8,), generator=g).tolist()
            frames = [vocab.audio_base + k * vocab.codebook_size + int(torch.randint(0, vocab.codebook_size, (1,),
                                                                                      generator=g))
                      for _ in range(4) for k in range(vocab.n_codebooks)]
            part = [vocab.bos_id, vocab.text_start, *text, vocab.text_end, vocab.audio_start, *frames,
                    vocab.audio_end, vocab.eos_id]
            ids += part
            docs += [doc] * len(part)
        items.append({"input_ids": torch.tensor(ids[:length]), "doc_ids": torch.tensor(docs[:length]),
                      "source": torch.tensor(0)})
    return items


@pytest.mark.parametrize("architecture", ["hierarchical", "flat"])
def test_loss_weights_change_the_loss_but_not_the_nll_vector(train_tokens, architecture):
    from torch.utils.data import default_collate

    from soda.hierarchical import regroup_batch
    from soda.train.config import TrainConfig
    from soda.train.module import SodaModule
    from soda.train.run import model_for_run
    from tokenize_audio.vocab import Vocabulary

    vocab = Vocabulary.load(train_tokens)
    batch = default_collate(_mixed_windows(vocab))
    if architecture == "hierarchical":  # what the loader reads for this family: the windows' steps
        batch = regroup_batch(batch, vocab)
    out = {}
    for scheme in ("uniform", "moshi", "graded"):
        cfg = TrainConfig(size="tiny", seq_len=128, architecture=architecture, loss_weights=scheme)
        model, _ = model_for_run(cfg, vocab)  # seeded: the same weights for every scheme
        module = SodaModule(model, cfg, vocab, steps=1, micro_per_step=1, flops_per_token=1.0)
        with torch.no_grad():
            out[scheme] = module._sums(batch)
    (uniform, sums), (moshi, moshi_sums), (graded, graded_sums) = out["uniform"], out["moshi"], out["graded"]
    assert sums.shape == (2, len(vocab.nll_groups())) and (sums[1] > 0).all()  # every kind scored
    assert torch.equal(sums, moshi_sums) and torch.equal(sums, graded_sums)
    assert abs(float(moshi) - float(uniform)) > 1e-3 and abs(float(graded) - float(moshi)) > 1e-3
    # moshi by hand from the unweighted sums (z-loss aside): sum w nll / sum w
    w = torch.tensor([100.0] * 3 + [1.0] * (vocab.n_codebooks - 1), dtype=torch.float64)
    assert float(moshi) == pytest.approx(float((w * sums[0]).sum() / (w * sums[1]).sum()), rel=2e-3)


def test_activation_checkpointing_gives_the_hierarchical_model_the_same_gradients(train_tokens):
    from torch.utils.data import default_collate

    from soda.hierarchical import regroup_batch
    from soda.train.config import TrainConfig
    from soda.train.run import model_for_run
    from tokenize_audio.vocab import Vocabulary

    vocab = Vocabulary.load(train_tokens)
    steps = regroup_batch(default_collate(_mixed_windows(vocab)), vocab)
    grads = []
    for checkpointing in (False, True):
        cfg = TrainConfig(size="tiny", seq_len=128, architecture="hierarchical",
                          activation_checkpointing=checkpointing)
        model, _ = model_for_run(cfg, vocab)
        model.train()
        model(steps, 1e-4)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert model.backbone.gradient_checkpointing and model.depth.gradient_checkpointing
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6), name


def test_compile_gives_the_hierarchical_model_the_same_loss_and_gradients(train_tokens, capsys):
    """--compile with --activation-checkpointing (`soda.hierarchical.prepare_for_training`: every backbone and depth
    decoder layer and the loss's chunk arithmetic through torch.compile, the layers recomputed in the backward):
    micro-batches of different step and frame counts give the eager model's losses and gradients, and the state
    dict keeps its plain keys. Tested on the model (about 15 s of compiling on the CPU), not a soda-train run (about
    a minute); the flag itself is accepted for the family."""
    from torch.utils.data import default_collate

    from soda.hierarchical import regroup_batch
    from soda.train.config import TrainConfig, make_config
    from soda.train.run import model_for_run
    from tokenize_audio.vocab import Vocabulary

    vocab = Vocabulary.load(train_tokens)
    batches = [regroup_batch(default_collate(_mixed_windows(vocab, n=n, length=length, seed=n)), vocab, multiple=16)
               for n, length in ((4, 88), (3, 120))]
    results = []
    for compiled in (False, True):
        cfg = TrainConfig(size="tiny", seq_len=128, architecture="hierarchical", activation_checkpointing=compiled,
                          compile=compiled)
        model, _ = model_for_run(cfg, vocab)
        model.train()
        losses_ = [model(steps, 1e-4)[0] for steps in batches]
        sum(losses_).backward()
        results.append(([float(x) for x in losses_], {n: p.grad for n, p in model.named_parameters()}))
    assert all(layer._compiled_call_impl is not None for layer in (*model.backbone.layers, *model.depth.layers))
    assert not any("_orig_mod" in k for k in model.state_dict())
    (eager, eager_grads), (got, got_grads) = results
    assert got == pytest.approx(eager, rel=1e-5)
    for name, g in eager_grads.items():
        assert torch.allclose(got_grads[name], g, atol=1e-5), name
    assert make_config({"architecture": "hierarchical", "compile": True, "strategy": "fsdp"}).compile


def _error(capsys, args, prog_main=main, prog: str = "soda-train") -> str:
    with pytest.raises(SystemExit) as exc:
        prog_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), err
    return last


@pytest.mark.parametrize("extra,said", [(["--attention", "flex_attention"], "sdpa or eager attention only")])
def test_what_the_hierarchical_family_cannot_do_yet_is_refused_in_one_line(train_tokens, tmp_path, capsys, extra,
                                                                           said):
    assert said in _error(capsys, hier_args(train_tokens, tmp_path / "r") + extra)


def test_init_from_takes_the_weights_of_a_hierarchical_export_run_directory_or_checkpoint(hier_run, train_tokens):
    from soda.hierarchical import load_export
    from soda.train.config import TrainConfig
    from soda.train.run import model_for_run
    from tokenize_audio.vocab import Vocabulary

    vocab = Vocabulary.load(train_tokens)
    want = load_export(hier_run / "hf").state_dict()
    for source in (hier_run / "hf", hier_run, hier_run / "checkpoints" / "last.ckpt"):
        cfg = TrainConfig(size="tiny", depth_layers=2, seq_len=128, architecture="hierarchical",
                          init_from=str(source), loss_weights="moshi")
        model, shape = model_for_run(cfg, vocab)
        assert shape == model.config.shape and shape.depth_layers == 4  # the model's shape, not the size flags
        assert model.training and model.config.loss_weights == "moshi"  # this run's loss weights
        assert model.weights[0] == 100 and model.weights[-1] == 1
        got = model.state_dict()
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), (source, name)


def test_a_run_from_an_export_starts_at_the_exported_models_loss(hier_run, train_tokens, tmp_path):
    """Its first step's loss is the export's loss on that step's batch (the windows of the source run's first step:
    the same seed and data)."""
    from soda.hierarchical import load_export
    from soda.train.cli import resolve_config
    from soda.train.plan import batch_layout, world_size
    from soda.train.run import build_data
    from soda.train.sources import resolve_sources

    out = tmp_path / "from_export"
    args = hier_args(train_tokens, out, **{"--size": None, "--init-from": str(hier_run / "hf"), "--max-steps": "2"})
    assert main(args + ["--no-export"]) == 0
    cfg = resolve_config({}, out, True, None, [])
    sources, vocab = resolve_sources(cfg.data, cfg.val_data, cfg.mix, cfg.vocab)
    data = build_data(cfg, sources, vocab, *batch_layout(cfg, world_size(cfg)))
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    model = load_export(hier_run / "hf").train()
    with torch.no_grad():
        want = float(model(batch, cfg.z_loss)[0])
    got = losses(out)
    assert sorted(got) == [0, 1]
    assert got[0] == pytest.approx(want, rel=1e-5)
    assert got[0] < losses(hier_run)[0] - 1  # far below a new model's first loss


def test_init_from_refuses_the_other_family_and_another_vocabulary_in_one_line(hier_run, train_tokens, tmp_path,
                                                                               capsys):
    import json
    import shutil

    from soda.train.config import TrainConfig
    from soda.train.run import model_for_run
    from tokenize_audio.vocab import Vocabulary

    export = hier_run / "hf"
    said = _error(capsys, tiny_args(train_tokens, tmp_path / "a") + ["--init-from", str(export)])
    assert f"--init-from {export}: a hierarchical model, but this run is --architecture flat" in said
    said = _error(capsys, tiny_args(train_tokens, tmp_path / "b") + ["--init-from", str(hier_run)])
    assert f"--init-from {hier_run}: a hierarchical model" in said
    flat = tmp_path / "flat"
    model, _ = model_for_run(TrainConfig(size="tiny", seq_len=128), Vocabulary.load(train_tokens))
    model.save_pretrained(flat)
    said = _error(capsys, hier_args(train_tokens, tmp_path / "c") + ["--init-from", str(flat)])
    assert f"--init-from {flat}: a flat model, but this run is --architecture hierarchical" in said
    other = tmp_path / "other"
    shutil.copytree(export, other)
    vocab = json.loads((other / "vocab.json").read_text())
    vocab["bos_id"], vocab["eos_id"] = vocab["eos_id"], vocab["bos_id"]  # the same size, other meanings
    (other / "vocab.json").write_text(json.dumps(vocab))
    said = _error(capsys, hier_args(train_tokens, tmp_path / "d") + ["--init-from", str(other)])
    assert f"--init-from {other}: its vocab.json differs from the data's vocabulary" in said
    said = _error(capsys, hier_args(train_tokens, tmp_path / "e") + ["--init-from", str(tmp_path / "nowhere")])
    assert f"--init-from {tmp_path / 'nowhere'}: no such checkpoint" in said


def test_depth_flags_belong_to_the_hierarchical_family(train_tokens, tmp_path, capsys):
    args = tiny_args(train_tokens, tmp_path / "r") + ["--depth-width", "16"]
    assert "--depth-width applies to --architecture hierarchical only" in _error(capsys, args)


def test_soda_eval_scores_a_hierarchical_run_and_names_the_family(hier_run, train_tokens, tmp_path):
    import json

    from soda.evaluate.cli import main as eval_main

    for n, source in enumerate((hier_run, hier_run / "checkpoints" / "last.ckpt")):
        out = tmp_path / f"e{n}"
        assert eval_main([str(source), "--tasks", "nll", "--data-for", f"nll={train_tokens}/validation-*.tar",
                          "--out", str(out), "--quiet"]) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["model"]["family"] == "hierarchical"
        assert results["tasks"]["nll"]["settings"]["family"] == "hierarchical"


def test_dry_run_plans_a_hierarchical_model(capsys):
    from soda.shape import SODA_VOCAB, HierarchicalShape, ModelShape, hierarchical_params

    assert main(["--dry-run", "--size", "600m", "--tokens", "10B", "--seq-len", "1024", *HIER]) == 0
    out = capsys.readouterr().out
    shape = HierarchicalShape(ModelShape(1024, 28, 16, 8, 128, 3072, SODA_VOCAB, 1024))
    assert "hierarchical: backbone width 1024" in out and "depth decoder width 512, 4 layers" in out
    assert f"parameters: {hierarchical_params(shape):,} total" in out
    assert "FLOPs per step (training" in out and "steps of 2048 x 1024 = 2,097,152 steps" in out


def run_cli(args: list[str]):
    """soda-train in a subprocess (Lightning launches the other ranks from it)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "soda.train", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def two_rank_args(data: Path, out: Path, strategy: str) -> list[str]:
    """Six steps of 8 sequences on two CPU ranks (gloo), checkpoints at steps 3 and 6."""
    return tiny_args(data, out, steps=6, **{"--ckpt-every": "3", "--val-every": "3"}) + HIER + [
        "--accelerator", "cpu", "--devices", "2", "--strategy", strategy]


@pytest.fixture(scope="module")
def ddp_run(train_tokens, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hier-ddp") / "run"
    done = run_cli(two_rank_args(train_tokens, out, "ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 devices x 4 sequences" in done.stderr
    return out


@pytest.fixture(scope="module")
def fsdp_run(train_tokens, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hier-fsdp") / "run"
    done = run_cli(two_rank_args(train_tokens, out, "fsdp"))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_process_ddp_on_cpu_trains_the_hierarchical_model(ddp_run):
    """Lightning's own two-process launch (gloo): every parameter takes part in every step (DDP would hang or fail
    otherwise), and the run logs every step's loss and NLL vector."""
    assert sorted(losses(ddp_run)) == list(range(6)) and len(losses(ddp_run, "train/nll_acoustic_cb7")) == 6


@pytest.mark.slow
def test_fsdp_trains_the_hierarchical_model_as_ddp_does_and_exports_it_from_its_shards(fsdp_run, ddp_run):
    """--strategy fsdp on two ranks: the same losses as DDP at every step; every rank writes its shards of each
    checkpoint; RUN/hf, gathered from the last sharded step, holds exactly its weights and loads as the family."""
    from soda.checkpoints import DCP_INDEX, LIGHTNING_META, load_checkpoint, load_model

    want, got = losses(ddp_run), losses(fsdp_run)
    assert sorted(got) == list(range(6))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    step6 = fsdp_run / "checkpoints" / "step0000006.ckpt"
    assert {p.name for p in step6.iterdir()} == {"__0_0.distcp", "__1_0.distcp", DCP_INDEX, LIGHTNING_META}
    saved = load_checkpoint(step6)["state_dict"]  # the shards read whole
    assert load_checkpoint(step6, mmap=True)["soda"]["architecture"] == "hierarchical"
    exported = load_model(str(fsdp_run / "hf"), device="cpu", hierarchical=True).model
    direct = load_model(str(step6), device="cpu", hierarchical=True).model
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, saved[f"model.{name}"]) and torch.equal(tensor, direct.state_dict()[name]), name
    ddp = load_model(str(ddp_run / "hf"), device="cpu", hierarchical=True).model
    for name, tensor in exported.state_dict().items():
        assert torch.allclose(tensor, ddp.state_dict()[name], atol=1e-5), name


@pytest.mark.slow
def test_fsdp_hierarchical_run_resumes_from_its_sharded_checkpoint_exactly(fsdp_run, train_tokens, tmp_path):
    """Resumed from step 3's shards (the later step moved away): the same losses at steps 3-5 and the same step-6
    weights as the uninterrupted run."""
    import shutil

    from soda.checkpoints import load_checkpoint

    out = tmp_path / "resumed"
    shutil.copytree(fsdp_run, out, symlinks=True)
    shutil.rmtree(out / "hf")
    (out / "checkpoints" / "step0000006.ckpt").rename(out / "checkpoints" / "later")
    done = run_cli(two_rank_args(train_tokens, out, "fsdp") + ["--resume", "--no-export"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Restored all states from the checkpoint" in done.stderr
    want, got = losses(fsdp_run), losses(out)
    for step in range(3, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    a = load_checkpoint(fsdp_run / "checkpoints" / "step0000006.ckpt")["state_dict"]
    b = load_checkpoint(out / "checkpoints" / "step0000006.ckpt")["state_dict"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name


def _fsdp_rank(rank: int, world: int, port: int, data: str, result: str) -> None:
    """One rank of `test_fsdp_ranks_without_frames_still_run_the_depth_decoder`: the model sharded by
    SodaModule.configure_model; rank 1's micro-batch is all text (no frame to score)."""
    import datetime
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from soda.train.config import TrainConfig
    from soda.train.module import SodaModule
    from soda.train.run import model_for_run
    from tokenize_audio.vocab import Vocabulary

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    vocab = Vocabulary.load(data)
    cfg = TrainConfig(size="tiny", seq_len=128, architecture="hierarchical")
    model, _ = model_for_run(cfg, vocab)
    module = SodaModule(model, cfg, vocab, steps=1, micro_per_step=1, flops_per_token=1.0)
    module._device_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    module.configure_model()
    model.train()
    loss = model(_rank_batch(vocab, rank), 1e-4)[0]
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}  # the mean over ranks
    if rank == 0:
        torch.save({"grads": grads, "loss": loss.detach()}, result)
    dist.destroy_process_group()


def _rank_batch(vocab, rank: int) -> dict:
    from torch.utils.data import default_collate

    from soda.hierarchical import regroup_batch

    windows = _mixed_windows(vocab, n=2, seed=rank)
    if rank == 1:  # text and markers only
        for w in windows:
            w["input_ids"] = torch.where(w["input_ids"] >= vocab.audio_base, vocab.text_start, w["input_ids"])
    return regroup_batch(default_collate(windows), vocab, multiple=16)


@pytest.mark.slow
def test_fsdp_ranks_without_frames_still_run_the_depth_decoder(train_tokens, tmp_path):
    """FSDP gathers the depth decoder's layers in their forward, so every rank must run it every step: a rank whose
    micro-batch holds no frame runs it on a stand-in frame weighted 0 (it would otherwise wait for the others
    forever). The sharded gradients equal the unsharded model's, averaged over the two ranks' batches."""
    import socket

    import torch.multiprocessing as mp

    from soda.train.config import TrainConfig
    from soda.train.run import model_for_run
    from tokenize_audio.vocab import Vocabulary

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_rank, args=(2, port, str(train_tokens), str(tmp_path / "grads.pt")), nprocs=2)
    sharded = torch.load(tmp_path / "grads.pt", weights_only=True)
    vocab = Vocabulary.load(train_tokens)
    model, _ = model_for_run(TrainConfig(size="tiny", seq_len=128, architecture="hierarchical"), vocab)
    model.train()
    assert (_rank_batch(vocab, 1)["codes"][..., 1] == -1).all()  # rank 1 has no frame
    losses_ = [model(_rank_batch(vocab, rank), 1e-4)[0] for rank in (0, 1)]
    (sum(losses_) / 2).backward()
    assert torch.allclose(sharded["loss"], losses_[0].detach(), atol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(sharded["grads"][name], p.grad, atol=1e-6), name
