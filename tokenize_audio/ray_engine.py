"""`soda-tokenize --engine ray`: the same planned shards, encoded on a Ray cluster with Ray Data.

One row per planned shard: a CPU task reads and decodes the shard's audio, then an actor pool (one actor per
GPU, or `cpu_workers` actors on CPU) encodes it with `ShardEncoder.encode_shard` and writes the .tar and its
sidecar into --out (a directory every node can reach). Reading, batching by duration and document building
are the single-process code run on the same inputs in the same order, so a shard's bytes never depend on the
worker count or on scheduling. Ray Data retries failed read tasks and restarts dead actors; a shard whose
sidecar was not written is simply encoded again, and a re-run skips finished shards as the local engine does.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from pathlib import Path

from tokenize_audio.encoding import default_batch_seconds
from tokenize_audio.errors import SodaError
from tokenize_audio.pipeline import (ShardEncoder, ShardPlan, TokenizeSettings, load_wave, plan_items, progress_bar,
                                     show_audio)

INSTALL_HINT = "--engine ray needs Ray Data: pip install 'ray[data]>=2.10' (or pip install '.[ray]')"


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise SodaError(INSTALL_HINT) from None
    return ray


@dataclass
class CodecSpec:
    """How each actor rebuilds the driver's codec (weights are loaded per actor, not shipped)."""

    spec: str
    codebooks: int
    device: str
    encode_chunk_seconds: float
    sample_rate: int
    samples_per_frame: int


class _ReadShard:
    """CPU task: a planned shard's (utterance index, wave | SkipItem) in plan order (text shards: nothing to read)."""

    def __init__(self, codec: CodecSpec, keep_truncated: bool):
        self.codec, self.keep_truncated = codec, keep_truncated

    def __call__(self, row: dict) -> dict:
        plan: ShardPlan = pickle.loads(row["plan"])
        waves = []
        if plan.kind == "speech":
            waves = [load_wave(u, self.codec.sample_rate, self.codec.samples_per_frame, self.keep_truncated)
                     for rec in plan.recordings for u in rec]
        return {"plan": row["plan"], "waves": pickle.dumps(waves, protocol=5)}


class _EncodeShard:
    """Actor: holds one codec; encodes and writes whole shards; returns each sidecar (JSON text)."""

    def __init__(self, codec: CodecSpec, settings: dict, out: str, batch_seconds: float | None):
        import json

        from tokenize_audio.codecs import load_codec
        from tokenize_audio.vocab import Vocabulary

        self._json = json
        loaded = load_codec(codec.spec, codec.codebooks, codec.device,
                            encode_chunk_seconds=codec.encode_chunk_seconds)
        self.encoder = ShardEncoder(loaded, Vocabulary.load(Path(out)), TokenizeSettings.from_dict(settings),
                                    Path(out), workers=1,
                                    batch_seconds=batch_seconds or default_batch_seconds(loaded), progress=False)

    def __call__(self, batch: dict) -> dict:
        from tqdm import tqdm

        sidecars = []
        for plan_blob, waves_blob in zip(batch["plan"], batch["waves"]):
            plan: ShardPlan = pickle.loads(plan_blob)
            utts = [u for rec in plan.recordings for u in rec] if plan.kind == "speech" else []
            loaded = list(zip(utts, pickle.loads(waves_blob))) if plan.kind == "speech" else None
            with tqdm(disable=True) as bar:
                sidecars.append(self._json.dumps(self.encoder.encode_shard(plan, bar, loaded)))
        return {"sidecar": sidecars}


def run_ray(todo: list[ShardPlan], codec: CodecSpec, settings: TokenizeSettings, out: Path,
            batch_seconds: float | None, *, address: str | None, gpus_per_worker: float, cpu_workers: int,
            progress: bool) -> list[dict]:
    """Encode the `todo` shards on Ray; return their sidecars. Starts (and stops) a local Ray instance unless
    one is already initialised in this process or `address` names a cluster. `batch_seconds` None: each actor
    picks the default for the device it got."""
    import json

    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0) if codec.device != "cpu" else 0
        if gpus and gpus_per_worker > 0:
            actors, resources = max(1, int(gpus // gpus_per_worker)), {"num_gpus": gpus_per_worker}
        else:  # no GPU: a few CPU actors, leaving cores for the read tasks (a pool taking every core deadlocks)
            actors, resources = cpu_workers, {"num_cpus": 1}
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours shows hours, h/s and ETA
        rows = [{"plan": pickle.dumps(plan)} for plan in todo]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
        ds = ds.map(_ReadShard(codec, settings.keep_truncated), num_cpus=1)
        ds = ds.map_batches(_EncodeShard, fn_constructor_args=(codec, settings.to_dict(), str(out), batch_seconds),
                            batch_size=1, concurrency=actors, **resources)
        sidecars, seconds, clock = [], 0.0, time.perf_counter()
        items = {plan.name: plan_items(plan) for plan in todo}
        with progress_bar(sum(items.values()), progress) as bar:
            for row in ds.iter_rows():
                sidecar = json.loads(row["sidecar"])
                sidecars.append(sidecar)
                seconds += sidecar.get("audio_seconds", 0.0)
                show_audio(bar, seconds, clock)
                bar.update(items[sidecar["name"]])
        return sidecars
    finally:
        if started_here:
            ray.shutdown()
