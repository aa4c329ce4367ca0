"""One runner at a time per sweep and per run: a lock that SLURM tasks take too, released by the kernel when its
holder dies."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from scaling.runs import PlannedRun
from tokenize_audio.errors import SodaError

LOCKS = "locks"  # SWEEP/locks/sweep.lock and one NAME.lock per run, outside the run directories a restart removes
HOST = socket.gethostname()
HOLDER = re.compile(r"pid (\d+) on host (\S+)")  # what a lock file says; the SLURM task writes the same line
NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}  # file systems mounted without flock


def sweep_lock_path(sweep: Path) -> Path:
    return Path(sweep) / LOCKS / "sweep.lock"


def run_lock_path(run: PlannedRun, sweep: Path) -> Path:
    return Path(sweep) / LOCKS / f"{run.name}.lock"


def _running(holder: str) -> bool:
    """Whether a lock's holder may still run: only a process of this host can be seen to be gone."""
    m = HOLDER.fullmatch(holder)
    if not m or m.group(2) != HOST:
        return True
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@contextmanager
def lock(path: Path, what: Path) -> Iterator[int]:
    """Hold `path` as the lock on `what` (a sweep or one run directory), refused with one line while another runner
    or SLURM task holds it. It is an flock(2), which the kernel drops when its holder dies however it dies, so a
    killed runner's lock is free (and said to be taken over); the file names the holder for the message. On a
    file system without flock the holder's pid decides alone. Yields the file descriptor: a child given it (pass_fds)
    keeps the lock while it runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flock = True
        except BlockingIOError:
            flock = False
        except OSError as err:
            if err.errno not in NO_FLOCK:
                raise
            flock = None
        f.seek(0)
        holder = f.read().strip()
        if flock is False or (flock is None and holder and _running(holder)):
            gone = " (gone; a soda-train it started still runs)" if flock is False and not _running(holder) else ""
            remove = f", or delete {path} if it is no longer running" if flock is None else ""
            raise SodaError(f"another soda-scaling run ({holder or 'unknown'}{gone}) is using {what}; wait for it to "
                            f"finish, or stop it{remove}")
        if holder:
            print(f"{what}: taking over the lock of {holder} (no longer running)", flush=True)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {HOST}\n")
        f.flush()
        try:
            yield f.fileno()
        finally:
            f.seek(0)
            f.truncate()  # released cleanly: no holder to name
