"""soda-tokenize engines: audio-seconds per wall-second, single process vs Ray, on the same corpus.

Each engine tokenizes the same input into a fresh --out with the whole CLI (reading, resampling, encoding,
documents, shards, manifest), and the script checks that both give the same shards. The Ray instance is
started once before the clock (its start-up, several seconds, is printed separately), so the Ray figure is
the steady-state rate a long run approaches. Prints a Markdown table.

Reproduce (from the repository root):

    python benchmarks/tokenize_engines.py                                     # demo corpus, small random Mimi
    python benchmarks/tokenize_engines.py --codec mimi:random-full --ray-cpus 2 --cpu-workers 1
    python benchmarks/tokenize_engines.py --codec mimi:random-full --device cuda    # GPU: one actor per GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenize_audio.cli import main as tokenize_main  # noqa: E402

DEFAULT_AUDIO = Path(__file__).resolve().parents[1] / "demo" / "corpus" / "speech"


def run(inputs: list[str], out: Path, args, *extra: str) -> tuple[float, float]:
    """(audio seconds, wall seconds) of one soda-tokenize run into a fresh `out`."""
    start = time.perf_counter()
    code = tokenize_main([*inputs, "--out", str(out), "--codec", args.codec, "--text-tokenizer", "bytes",
                          "--device", args.device, "--recordings-per-shard", str(args.recordings_per_shard),
                          "--quiet", *extra])
    wall = time.perf_counter() - start
    assert code == 0, f"soda-tokenize exited {code}"
    return json.loads((out / "manifest.json").read_text())["audio_seconds"], wall


def shard_bytes(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="*", default=[str(DEFAULT_AUDIO)])
    p.add_argument("--codec", default="mimi:random")
    p.add_argument("--device", default="cpu")
    p.add_argument("--recordings-per-shard", type=int, default=2, help="small shards give Ray work to spread")
    p.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray instance")
    p.add_argument("--cpu-workers", type=int, default=1, help="codec actors without a GPU")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        local_audio, local_wall = run(args.inputs, Path(tmp) / "local", args)
        # Ray gives each actor OMP_NUM_THREADS = its CPUs (1); the same torch setting in one process, for fairness.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        _, one_thread_wall = run(args.inputs, Path(tmp) / "one-thread", args)
        torch.set_num_threads(threads)
        clock = time.perf_counter()
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - clock
        try:
            ray_audio, ray_wall = run(args.inputs, Path(tmp) / "ray", args, "--engine", "ray",
                                      "--cpu-workers", str(args.cpu_workers))
        finally:
            ray.shutdown()
        same = shard_bytes(Path(tmp) / "local") == shard_bytes(Path(tmp) / "ray")

    print(f"codec {args.codec} on {args.device}, {os.cpu_count()} CPU cores, {local_audio / 60:.1f} min of audio, "
          f"{args.recordings_per_shard} recordings per shard; Ray started in {ray_start:.1f} s (not counted); "
          f"identical shards: {same}\n")
    print("| engine | wall s | audio-s per wall-s |")
    print("|---|---:|---:|")
    print(f"| single process (--workers default, {threads} torch threads) | {local_wall:.1f} | "
          f"{local_audio / local_wall:.1f} |")
    print(f"| single process, 1 torch thread | {one_thread_wall:.1f} | {local_audio / one_thread_wall:.1f} |")
    print(f"| Ray ({args.ray_cpus} CPUs, {args.cpu_workers} codec actor(s)) | {ray_wall:.1f} | "
          f"{ray_audio / ray_wall:.1f} |")


if __name__ == "__main__":
    main()
