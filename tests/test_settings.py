"""Settings declared once (soda/settings.py): every flag, bound, resume rule and sweep rule is read from the
dataclass fields, so these tests fail when a field's declaration and what is derived from it drift apart."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest
import yaml

from soda.settings import (ADJUSTABLE, FIXED, RESUMABLE, add_arguments, check_bounds, flag_of, from_args,
                           names_with, setting)
from soda.train.config import (ADJUSTABLE_ON_RESUME, PREDATES, RESUMABLE_CHANGES, RunOptions, TrainConfig, load_yaml,
                               sweep_flags)
from tokenize_audio.errors import SodaError


def _dests(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}  # a test may look inside argparse; the code does not


def test_every_train_setting_has_a_flag_or_is_marked_file_only():
    from soda.train.cli import build_parser

    actions = _dests(build_parser())
    file_only = set()
    for f in dataclasses.fields(TrainConfig):
        assert "flag" in f.metadata, f"{f.name}: declare it with soda.settings.setting()"
        if flag_of(f) is None:
            file_only.add(f.name)
            continue
        assert f.name in actions and flag_of(f) in actions[f.name].option_strings, f.name
        assert actions[f.name].default is None, f"{f.name}: a flag not given must leave --config's value"
    assert file_only == {"rope_theta", "rope_factor", "betas", "eps", "epochs"}
    for f in dataclasses.fields(RunOptions):
        assert f.name in actions and actions[f.name].default == f.default, f.name


def test_flags_parse_into_the_settings_they_name():
    from soda.train.cli import build_parser, flag_values

    args = build_parser().parse_args(["--no-cautious", "--no-export", "--compile", "--lr", "0.01", "--data", "a",
                                      "--data", "b", "--weight-decay-mode", "adamw", "--mix", "a=1,b=3"])
    assert flag_values(args) == {"cautious": False, "export": False, "compile": True, "lr": 0.01, "data": ["a", "b"],
                                 "weight_decay_mode": "adamw", "mix": {"a": 1.0, "b": 3.0}}


def test_derived_resume_rules_bounds_and_predates():
    assert RESUMABLE_CHANGES == set(names_with(TrainConfig, "resume", RESUMABLE))
    assert set(ADJUSTABLE_ON_RESUME) == {"lr", "grad_clip", "z_loss", "weight_decay"}
    assert {"workers", "devices", "max_steps", "out", "export"} <= RESUMABLE_CHANGES
    assert not RESUMABLE_CHANGES & {"seq_len", "tokens", "size", "data", "seed", "schedule"}
    assert PREDATES == {"weight_decay_mode": "adamw"}
    fields = dataclasses.fields(TrainConfig)
    at_least = {f.name: f.metadata["at_least"] for f in fields if f.metadata["at_least"] is not None}
    assert at_least["seq_len"] == 2 and at_least["workers"] == 0 and at_least["width"] == 1
    assert {f.name for f in fields if f.metadata["positive"]} == {"lr", "eps", "peak_flops", "epochs",
                                                                     "sample_max_seconds"}


@pytest.mark.parametrize("name", sorted(RESUMABLE_CHANGES | set(ADJUSTABLE_ON_RESUME)))
def test_a_setting_marked_resumable_passes_the_resume_check(name, tmp_path):
    from soda.train.cli import resolve_config

    saved = TrainConfig(size="tiny", data=["x"], out=str(tmp_path))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved.to_dict(), sort_keys=False))
    other = {"out": str(tmp_path), "export": False, "devices": 2, "precision": "32-true", "on_nonfinite": "skip",
             "skip_bad_shards": True, "wandb": "p", "accelerator": "cpu", "strategy": "ddp", "peak_flops": 1e12,
             "max_steps": 3, "micro_batch": 2, "sample_every": 0, "async_checkpoint": True}
    value = other.get(name, getattr(saved, name) * 2 if getattr(saved, name) else 1)
    cfg = resolve_config({name: value}, tmp_path, True, None, [])
    if name != "out":
        assert getattr(cfg, name) == value


def test_a_fixed_setting_is_refused_on_resume(tmp_path):
    from soda.train.cli import resolve_config

    saved = TrainConfig(size="tiny", data=["x"], out=str(tmp_path))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved.to_dict(), sort_keys=False))
    fixed = names_with(TrainConfig, "resume", FIXED)
    assert "seq_len" in fixed and "seed" in fixed
    for name, value in (("seq_len", 128), ("seed", 3), ("schedule", "cosine")):
        with pytest.raises(SodaError, match=f"--resume: {name} differ"):
            resolve_config({name: value}, tmp_path, True, None, [])


def test_yaml_keys_are_the_fields(tmp_path):
    (tmp_path / "a.yaml").write_text("seq-len: 128\nrope_theta: 10000\n")
    assert load_yaml(tmp_path / "a.yaml") == {"seq_len": 128, "rope_theta": 10000}
    (tmp_path / "b.yaml").write_text("dry_run: true\n")  # a run option, not a setting of the run
    with pytest.raises(SodaError, match="unknown setting"):
        load_yaml(tmp_path / "b.yaml")


def test_sweep_flags_are_derived_from_soda_trains_settings():
    from scaling import records, sweep
    from soda.train.cli import build_parser

    assert sweep.RESERVED_FLAGS == sweep_flags("reserved") == {
        "--out", "--resume", "--config", "--data", "--size", "--sweep-width", "--width", "--layers", "--heads",
        "--kv-heads", "--head-dim", "--ffn", "--seq-len", "--tokens", "--batch-tokens", "--lr", "--max-steps",
        "--init-from", "--dry-run", "--architecture", "--depth-width", "--depth-layers"}
    assert records.HOW_IT_RUNS == sweep_flags("how")
    options = {o for a in build_parser()._actions for o in a.option_strings}
    assert sweep.RESERVED_FLAGS | records.HOW_IT_RUNS <= options
    fields = {flag_of(f): f for f in dataclasses.fields(TrainConfig)}
    assert all(fields[flag].metadata["resume"] == RESUMABLE for flag in records.HOW_IT_RUNS)


def test_finetune_flags_come_from_the_same_declaration_with_its_own_defaults():
    from soda.finetune.cli import FINETUNE_DEFAULTS, MODEL_FLAGS, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    s2st = _dests(sub.choices["s2st"])
    assert s2st["lr"].help == f"peak LR (default: SODA's rule) (soda-finetune default: {FINETUNE_DEFAULTS['lr']})"
    assert s2st["z_loss"].help == "(soda-finetune default: 0.0001)"
    assert s2st["out"].help.startswith("run directory (required)")
    assert s2st["epochs"].help.startswith("passes over the training data")
    assert "manifest" in s2st and "loss_after" not in s2st and "data" not in s2st
    docs = _dests(sub.choices["docs"])
    assert "loss_after" in docs and "data" in docs
    assert not {o for a in docs.values() for o in a.option_strings} & MODEL_FLAGS - {"--init-from"}


def test_eval_flags_and_eval_settings_are_one_declaration():
    from soda.evaluate.cli import build_parser
    from soda.evaluate.tasks import EvalSettings, available

    parser = build_parser(available())
    defaults = from_args(EvalSettings, parser.parse_args(["ckpt", "--out", "o"]))
    assert defaults == EvalSettings()
    given = from_args(EvalSettings, parser.parse_args(
        ["ckpt", "--out", "o", "--score", "sum", "--judges", "a, b,", "--source-language", "fr", "--quiet"]))
    assert (given.reduction, given.judges, given.s2st_source_language, given.progress) == ("sum", ["a", "b"], "fr",
                                                                                         False)
    with pytest.raises(SodaError, match="--max-len 0: must be at least 1"):
        check_bounds(EvalSettings(max_len=0))


def test_the_helper_turns_metadata_into_arguments_and_checks():
    @dataclass
    class Demo:
        count: int = setting(3, type=int, at_least=1, group="numbers", help="how many")
        rate: float | None = setting(None, type=float, positive=True)
        name: str = setting("x", flag=False)
        loud: bool = setting(True, flag="--quiet", action="store_false", group="output", resume=ADJUSTABLE)

    p = argparse.ArgumentParser()
    add_arguments(p, Demo, helps={"rate": "per second"})
    assert [g.title for g in p._action_groups[2:]] == ["numbers", "output"]
    assert "--name" not in p.format_help() and "per second" in p.format_help()
    demo = from_args(Demo, p.parse_args(["--count", "5", "--quiet"]))
    assert (demo.count, demo.rate, demo.name, demo.loud) == (5, None, "x", False)
    assert names_with(Demo, "resume", ADJUSTABLE) == ("loud",)
    with pytest.raises(SodaError, match="--count 0: must be at least 1"):
        check_bounds(Demo(count=0))
    with pytest.raises(SodaError, match="--rate -1.0: must be positive"):
        check_bounds(Demo(rate=-1.0))
    unset = argparse.ArgumentParser()
    add_arguments(unset, Demo, unset=(Demo,))
    assert vars(unset.parse_args([])) == {"count": None, "rate": None, "loud": None}
    with pytest.raises(TypeError, match="unknown"):
        setting(1, kind=int)


def test_soda_train_tokenizes_its_demo_through_a_function(monkeypatch, tmp_path):
    import tokenize_audio.cli
    from soda.train.cli import prepare_demo_data

    calls = []
    monkeypatch.setattr(tokenize_audio.cli, "tokenize_args", lambda args: calls.append(args) or 0)
    prepare_demo_data(tmp_path)
    (args,) = calls
    assert (args.codec, args.text_tokenizer, args.quiet) == ("mimi:random", "bytes", True)
    assert args.out == tmp_path / "tokens"
    assert len(args.inputs) == 2 and args.workers >= 1  # soda-tokenize's own defaults for the rest
    with pytest.raises(TypeError, match="unknown option"):
        tokenize_audio.cli.tokenize(["x"], tmp_path, codex="mimi")


def test_a_resumed_fine_tuning_run_keeps_its_settings_and_takes_only_resumable_flags(tmp_path):
    """soda-finetune grpo / instruct --architecture encoder-projector: on --resume, the saved settings; a flag may
    change only where it is resumable; the data it was made from may be named again; --max-steps is not carried."""
    from dataclasses import dataclass, field

    from soda.settings import resumed

    @dataclass
    class Run:
        data: str = ""
        lr: float = field(default=1e-3, metadata={"resumable": False})
        devices: str = field(default="1", metadata={"resumable": True})
        max_steps: int | None = field(default=None, metadata={"resumable": True})

    saved = {"data": "q.json", "lr": 1e-3, "devices": "1", "max_steps": 40, "task": "x"}
    s = resumed(Run, saved, {"devices": "2", "data": "q.json"}, tmp_path / "config.yaml", {"data"})
    assert (s.data, s.lr, s.devices, s.max_steps) == ("q.json", 1e-3, "2", None)
    assert resumed(Run, saved, {"max_steps": 80}, tmp_path / "config.yaml").max_steps == 80
    assert resumed(Run, saved, {"lr": 1e-3}, tmp_path / "config.yaml").lr == 1e-3  # the same value again is fine
    with pytest.raises(SodaError, match=r"--resume: --lr differ from the run's .*config.yaml \(only how the run "
                                        r"runs may change: logging\)"):
        resumed(Run, saved, {"lr": 3e-3, "devices": "2"}, tmp_path / "config.yaml", how=": logging")
