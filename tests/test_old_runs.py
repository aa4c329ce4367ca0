"""Run directories written before the restructure keep working: their config.yaml has exactly today's keys in
today's order (so --resume accepts it and a new run writes the same file), and checkpoints hold only plain data
(loaded with weights_only=True), so no module path inside them can go stale."""

from pathlib import Path

import yaml

from soda.train.config import load_yaml, make_config

OLD_CONFIG = Path(__file__).parent / "fixtures" / "config_before_restructure.yaml"


def test_an_old_config_is_read_back_key_for_key():
    old = load_yaml(OLD_CONFIG)
    cfg = make_config(old)
    assert list(cfg.to_dict()) == list(old)
    assert cfg.to_dict() == old
    assert yaml.safe_dump(cfg.to_dict(), sort_keys=False) == yaml.safe_dump(old, sort_keys=False)
