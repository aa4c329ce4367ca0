"""A sweep as a SLURM job array: the same soda-train command lines as a local `soda-scaling run`.

Each array task runs one plan row. Its resume logic is the local runner's, in bash, because a
task may be re-queued (pre-emption, or the time limit: SLURM sends SIGTERM 120 s before it,
soda-train checkpoints and exits 143, and the task re-queues itself): a finished run is skipped,
one with a checkpoint continues with --resume, one that died before its first checkpoint starts
again (keeping the record of its settings, written here). A task holds its run's lock (`flock`, the
local runner's lock) while it works, and leaves a run another task or runner holds alone. The task
writes the same finished marker the local runner writes, so `--gather-only` builds results.csv from
either. Every path is quoted (`#SBATCH` lines in double quotes, as Slurm reads them), and a line
break in any argument is refused: commands.txt holds one command per line.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from scaling.locks import LOCKS, lock, run_lock_path
from scaling.records import Setting, check_records, write_record
from scaling.runs import CHECKPOINTS, DONE, RECORD, TRAIN_CONFIG, PlannedRun, state
from scaling.sweep import PREEMPTED, train_command, write_run_config
from tokenize_audio.errors import SodaError
from tokenize_audio.shards import atomic_write_text

SBATCH_FILE, COMMANDS_FILE = "sweep.sbatch", "commands.txt"

TASK = """\
run=${{RUNS[$((SLURM_ARRAY_TASK_ID - 1))]}}
lock={locks}/${{run##*/}}.lock
mkdir -p -- {locks}
exec 9>>"$lock"
if command -v flock > /dev/null; then
  if ! flock -n 9; then
    echo "another soda-scaling run ($(cat -- "$lock")) is using $run; this task leaves it alone" >&2
    exit 1
  fi
  echo "pid $$ on host $(hostname)" > "$lock"
  trap ': > "$lock"' EXIT
else
  echo "warning: no flock command on $(hostname): this task trains $run without taking its lock" >&2
fi
command=$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {commands})
if [[ -e $run/{done} ]]; then echo "$run: finished earlier"; exit 0; fi
if compgen -G "$run/{checkpoints[0]}" > /dev/null || [[ -e $run/{checkpoints[1]} ]]; then command+=" --resume"
elif [[ -e $run/{config} ]]; then  # died before its first checkpoint: start again
  find "$run" -mindepth 1 -maxdepth 1 ! -name {record} -exec rm -rf -- {{}} +
fi
eval "srun $command"
code=$?
if (( code == {preempted} )); then
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"  # checkpointed on SIGTERM: continue later
  exit $code
fi
(( code == 0 )) || exit $code
printf '{{"exit_code": 0, "finished": "%s", "slurm_task": "%s"}}\\n' "$(date +%Y-%m-%dT%H:%M:%S)" \\
  "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}" > "$run/.{done}.tmp"
mv -f "$run/.{done}.tmp" "$run/{done}"
"""


def one_line(values) -> None:
    """Refuse a line break in anything written into the script or commands.txt (one command per line)."""
    for value in values:
        if "\n" in value or "\r" in value:
            raise SodaError(f"{value!r} contains a line break: the SLURM script and commands.txt hold one command per "
                            f"line (rename the path, or leave the line break out)")


def sbatch_file(directory: Path, pattern: str) -> str:
    """A file in `directory` as an #SBATCH option's value: in double quotes (Slurm splits unquoted values on spaces),
    `%` in the directory doubled (Slurm expands %A, %a, ... of `pattern` in file names). Slurm has no escape for a
    double quote: refused."""
    if '"' in str(directory):
        raise SodaError(f"{directory}: a double quote in the sweep's path cannot be written into an #SBATCH line; "
                        f"choose another --out")
    return f'"{str(directory).replace("%", "%%")}/{pattern}"'


def emit_slurm(runs: list[PlannedRun], sweep: Path, data: list[str], extra: list[str], val_tokens: int,
               plan: Path, gather_hint: str, rerun_changed: bool = False) -> tuple[Path, Path]:
    """Write SWEEP/commands.txt (one soda-train command per task), SWEEP/sweep.sbatch and each run's record of its
    settings; train nothing. Runs trained with other settings are refused, or with `rerun_changed` removed to be
    trained again; a run whose lock a task holds is refused (re-emit once it has stopped)."""
    commands = [train_command(r, sweep, data, extra, val_tokens) for r in runs]
    one_line([a for command in commands for a in command] + [str(Path.cwd()), str(plan), gather_hint])
    output = sbatch_file(Path.cwd() / sweep / "logs", "slurm-%A_%a.out")  # sbatch reads it where it is submitted
    setting = Setting(tuple(data), tuple(extra), val_tokens)
    changed = check_records(runs, sweep, setting, rerun_changed)
    for run in runs:
        with lock(run_lock_path(run, sweep), run.run_dir(sweep)):
            if run.name in changed:
                shutil.rmtree(run.run_dir(sweep))
            if state(run, sweep) not in ("done", "resume"):
                write_record(run, sweep, setting)
            write_run_config(run, sweep)
    commands_file = sweep / COMMANDS_FILE
    atomic_write_text(commands_file, "".join(shlex.join(command) + "\n" for command in commands))
    (sweep / "logs").mkdir(parents=True, exist_ok=True)
    sbatch = sweep / SBATCH_FILE
    script = "\n".join([
        "#!/bin/bash",
        f"# SODA IsoFLOP sweep: {len(runs)} runs of {shlex.quote(str(plan))}, one array task each (written by "
        "soda-scaling run --emit slurm).",
        "# Add your cluster's resources (partition, GPUs per task, time limit) below, then:",
        f"#   {shlex.join(['sbatch', str(sbatch)])}",
        "# Re-queued or re-submitted tasks continue their runs. When all are done, gather the results:",
        f"#   {gather_hint}",
        "#SBATCH --job-name=soda-sweep",
        f"#SBATCH --array=1-{len(runs)}",
        f"#SBATCH --output={output}",
        "#SBATCH --requeue",
        "#SBATCH --signal=TERM@120",
        "set -uo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        "RUNS=(",
        *(f"  {shlex.quote(str(r.run_dir(sweep)))}" for r in runs),
        ")",
        TASK.format(commands=shlex.quote(str(commands_file)), locks=shlex.quote(str(sweep / LOCKS)), done=DONE,
                    checkpoints=CHECKPOINTS, config=TRAIN_CONFIG, record=RECORD, preempted=PREEMPTED),
    ])
    atomic_write_text(sbatch, script)
    sbatch.chmod(0o755)
    return sbatch, commands_file
