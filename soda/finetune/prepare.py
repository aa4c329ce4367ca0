"""What every fine-tuning command prepares on rank 0 before training (the starting weights, the data report), and
how the other ranks of a torchrun launch wait for it."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from soda.train.run import is_rank_zero
from tokenize_audio.errors import SodaError


def init_target(source: str, out: Path) -> tuple[str, Path | None]:
    """(what soda-train's --init-from loads, the `.ckpt` to export there first or None): a Hugging Face directory
    or hub id as it is; a `.ckpt` file or sharded directory (or a run without an export) becomes RUN/init."""
    from soda.checkpoints import is_checkpoint, resolve_checkpoint

    target = resolve_checkpoint(source)
    if isinstance(target, Path) and is_checkpoint(target):
        return str(out / "init"), target
    return str(target), None


def init_model_dir(source: str, out: Path, vocab) -> str:
    """init_target's directory, with a `.ckpt` exported to it (by rank 0; the other ranks wait for it)."""
    from soda.checkpoints import export_hf

    init, checkpoint = init_target(source, out)
    if checkpoint is not None:
        if not is_rank_zero():  # rank 0 exports (atomically: the directory appears whole)
            wait_for(Path(init) / "config.json")
        elif not (Path(init) / "config.json").is_file():
            export_hf(checkpoint, Path(init), vocab=vocab)
    return init


def wait_for(path: Path, timeout: float = 24 * 3600, refused=None) -> None:
    """Ranks other than 0 (under torchrun) wait for rank 0 to prepare the data or the initial weights; `refused()`,
    when given, is rank 0's reason to stop (checked while waiting: the other ranks stop with it)."""
    started = time.time()
    while not path.is_file():
        if refused is not None and (reason := refused()):
            raise SodaError(f"rank 0 refused the data: {reason}")
        if time.time() - started > timeout:
            raise SodaError(f"waited {timeout:.0f} s for rank 0 to write {path}")
        time.sleep(2)


def summarize_skips(skipped: list[dict]) -> dict:
    reasons = Counter(s["reason"].split(":")[0] for s in skipped)
    return {"skipped_count": len(skipped), "skipped_reasons": dict(reasons.most_common()), "skipped": skipped}
