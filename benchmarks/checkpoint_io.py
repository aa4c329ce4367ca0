"""Checkpoint save and load time on two CPU ranks (gloo): one file with the whole state vs FSDP's sharded directory.

The model is a Qwen3 of the chosen shape with AdamW moments (weights + 2 moments, fp32), saved and loaded by the
code soda-train runs:
  single file, DDP           rank 0 writes the whole state (AtomicCheckpointIO); each rank loads the whole file
  single file, FSDP gathered the shards gathered on rank 0, which writes them (soda-train's FSDP before sharded
                             checkpoints); loaded by Lightning's ModelParallelStrategy (rank 0 reads, broadcasts)
  sharded, FSDP              every rank writes its shards (ShardedCheckpoints: DCP into a temporary directory,
                             renamed whole); loaded (and resharded) by DCP
  ... --async-checkpoint     the same writes in a background thread: "save" is the time training is blocked
                             (the copy of the state), "until whole" the time until the checkpoint stands

    python benchmarks/checkpoint_io.py [--width 1024 --layers 12 --ffn 3072] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch


def build(args, world: int, shard: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                         num_key_value_heads=max(1, args.width // 256), head_dim=64, tie_word_embeddings=False)
    holder = torch.nn.Module()  # the LightningModule's place: its `model` attribute
    holder.model = Qwen3ForCausalLM(config)
    if shard:  # as SodaModule.configure_model shards it
        mesh = init_device_mesh("cpu", (world,))
        for layer in holder.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(holder.model.get_output_embeddings(), mesh=mesh)
        fully_shard(holder.model.model, mesh=mesh)
    opt = torch.optim.AdamW(holder.parameters(), lr=1e-4)
    for p in holder.parameters():  # one step, so the moments exist
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    opt.zero_grad()
    return holder, opt


def strategy_on(rank: int, world: int, **kwargs):
    from lightning.fabric.plugins.environments import LightningEnvironment

    from soda.train.checkpointing import ShardedCheckpoints

    strategy = ShardedCheckpoints(data_parallel_size=world, tensor_parallel_size=1, **kwargs)
    env = LightningEnvironment()
    env.set_global_rank(rank)
    env.set_world_size(world)
    strategy.cluster_environment = env
    strategy.parallel_devices = [torch.device("cpu")] * world
    return strategy


def timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()  # every rank is blocked until the slowest is done
    return time.perf_counter() - t0


def worker(rank: int, world: int, port: int, args, out: str, results: dict) -> None:
    import torch.distributed as dist
    from lightning.fabric.strategies.model_parallel import _load_checkpoint
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from soda.train.checkpointing import AtomicCheckpointIO

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    root, rows = Path(out), []

    # single file, DDP: every rank holds everything; rank 0 writes
    model, opt = build(args, world, shard=False)
    path = root / "ddp" / "step0000001.ckpt"
    io = AtomicCheckpointIO()

    def state():
        return {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}

    save = timed(lambda: rank == 0 and io.save_checkpoint(state(), path))
    load = timed(lambda: model.load_state_dict(torch.load(path, weights_only=True)["state_dict"]))
    rows.append(("single file, DDP", save, None, load, path.stat().st_size))
    background = AtomicCheckpointIO(background=True)
    path2 = root / "ddp-async" / "step0000001.ckpt"
    blocked = timed(lambda: rank == 0 and background.save_checkpoint(state(), path2))
    whole = blocked + timed(lambda: rank == 0 and background.saves.wait())
    rows.append(("single file, DDP, --async-checkpoint", blocked, whole, None, path2.stat().st_size))
    del model, opt

    # FSDP: the model and moments sharded over the ranks
    model, opt = build(args, world, shard=True)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sharded = StateDictOptions(full_state_dict=False, cpu_offload=True)
    path = root / "gathered" / "step0000001.ckpt"

    def gathered_save():
        ckpt = {"state_dict": get_model_state_dict(model, options=full),
                "optimizer_states": [get_optimizer_state_dict(model, opt, options=full)]}
        if rank == 0:
            io.save_checkpoint(ckpt, path)

    save = timed(gathered_save)
    load = timed(lambda: _load_checkpoint(path, {"state_dict": model, "optimizer_0": opt},
                                          optimizer_states_from_list=True, weights_only=True))
    rows.append(("single file, FSDP gathered on rank 0", save, None, load, path.stat().st_size))

    def sharded_state():
        return {"state_dict": get_model_state_dict(model, options=sharded),
                "optimizer_states": [get_optimizer_state_dict(model, opt, options=sharded)], "global_step": 1}

    for background, name in ((False, "sharded, FSDP"), (True, "sharded, FSDP, --async-checkpoint")):
        strategy = strategy_on(rank, world, background=background)
        path = root / ("sharded-async" if background else "sharded") / "step0000001.ckpt"
        blocked = timed(lambda: strategy.save_checkpoint(sharded_state(), path))
        whole = blocked + timed(lambda: strategy.saves.wait()) if background else None
        load = None if background else timed(lambda: _load_checkpoint(
            path, {"state_dict": model, "optimizer_0": opt}, optimizer_states_from_list=True, weights_only=True))
        rows.append((name, blocked, whole, load, sum(f.stat().st_size for f in path.iterdir())))
    if rank == 0:
        results["rows"] = rows
        results["params"] = sum(p.numel() for p in model.parameters())
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=16646)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--out", type=Path, help="where to write the checkpoints (default: a temporary directory beside "
                                            "this repository's runs/); removed afterwards")
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="checkpoint_io.", dir=args.out or Path.cwd()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(worker, args=(args.ranks, port, args, str(out), results), nprocs=args.ranks)
            rows, params = results["rows"], results["params"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"{params / 1e6:.0f}M parameters (width {args.width}, {args.layers} layers, FFN {args.ffn}, vocab "
          f"{args.vocab}), AdamW, fp32; {args.ranks} ranks (gloo)\n")
    print("| layout | save s (training blocked) | until whole s | load s | size GB |")
    print("|---|---:|---:|---:|---:|")
    fmt = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    for name, save, whole, load, size in rows:
        print(f"| {name} | {fmt(save)} | {fmt(whole if whole is not None else save)} | {fmt(load)} | "
              f"{size / 1e9:.2f} |")


if __name__ == "__main__":
    main()
