"""Run directories written before the restructure keep working: their config.yaml reads back with every value and
in the same order (settings added since take their defaults, so --resume accepts it), and checkpoints hold only plain data
(loaded with weights_only=True), so no module path inside them can go stale."""

from pathlib import Path

import yaml

from soda.train.config import load_yaml, make_config

OLD_CONFIG = Path(__file__).parent / "fixtures" / "config_before_restructure.yaml"


# settings added since the fixture was written, and the value an old run takes for them
ADDED_SINCE = {"async_checkpoint": False, "architecture": "flat", "depth_width": None, "depth_layers": 4,
               "loss_weights": "uniform"}


def test_an_old_config_is_read_back_key_for_key():
    old = load_yaml(OLD_CONFIG)
    cfg = make_config(old).to_dict()
    assert {k: v for k, v in cfg.items() if k in old} == old  # every old setting, its value unchanged
    assert [k for k in cfg if k in old] == list(old)  # in the same order
    assert {k: v for k, v in cfg.items() if k not in old} == ADDED_SINCE  # nothing else, at the default
    saved = yaml.safe_load(yaml.safe_dump(cfg, sort_keys=False))
    assert make_config(saved).to_dict() == cfg  # a run saved today reads back the same
