"""A sweep as a SLURM job array: the same soda-train command lines as a local `soda-scaling run`.

Each array task runs one plan row. Its resume logic is the local runner's, in bash, because a
task may be re-queued (pre-emption, or the time limit: SLURM sends SIGTERM 120 s before it,
soda-train checkpoints and exits 143, and the task re-queues itself): a finished run is skipped,
one with a checkpoint continues with --resume, one that died before its first checkpoint starts
again. The task writes the same finished marker the local runner writes, so `--gather-only`
builds results.csv from either.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from tokenize_audio.shards import atomic_write_text

from .sweep import CHECKPOINTS, DONE, PREEMPTED, TRAIN_CONFIG, PlannedRun, train_command, write_run_config

SBATCH_FILE, COMMANDS_FILE = "sweep.sbatch", "commands.txt"

TASK = """\
run=${{RUNS[$((SLURM_ARRAY_TASK_ID - 1))]}}
command=$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {commands})
if [[ -e $run/{done} ]]; then echo "$run: finished earlier"; exit 0; fi
if compgen -G "$run/{checkpoints[0]}" > /dev/null || [[ -e $run/{checkpoints[1]} ]]; then command+=" --resume"
elif [[ -e $run/{config} ]]; then rm -rf -- "$run"; fi  # died before its first checkpoint: start again
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


def emit_slurm(runs: list[PlannedRun], sweep: Path, data: list[str], extra: list[str], val_tokens: int,
               plan: Path, gather_hint: str) -> tuple[Path, Path]:
    """Write SWEEP/commands.txt (one soda-train command per task) and SWEEP/sweep.sbatch; train nothing."""
    for run in runs:
        write_run_config(run, sweep)
    commands = sweep / COMMANDS_FILE
    atomic_write_text(commands, "".join(shlex.join(train_command(r, sweep, data, extra, val_tokens)) + "\n"
                                        for r in runs))
    (sweep / "logs").mkdir(parents=True, exist_ok=True)
    script = "\n".join([
        "#!/bin/bash",
        f"# SODA IsoFLOP sweep: {len(runs)} runs of {plan}, one array task each (written by soda-scaling run "
        "--emit slurm).",
        "# Add your cluster's resources (partition, GPUs per task, time limit) below, then:",
        f"#   sbatch {sweep / SBATCH_FILE}",
        "# Re-queued or re-submitted tasks continue their runs. When all are done, gather the results:",
        f"#   {gather_hint}",
        "#SBATCH --job-name=soda-sweep",
        f"#SBATCH --array=1-{len(runs)}",
        f"#SBATCH --output={sweep / 'logs'}/slurm-%A_%a.out",
        "#SBATCH --requeue",
        "#SBATCH --signal=TERM@120",
        "set -uo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        "RUNS=(",
        *(f"  {shlex.quote(str(r.run_dir(sweep)))}" for r in runs),
        ")",
        TASK.format(commands=shlex.quote(str(commands)), done=DONE, checkpoints=CHECKPOINTS, config=TRAIN_CONFIG,
                    preempted=PREEMPTED),
    ])
    sbatch = sweep / SBATCH_FILE
    atomic_write_text(sbatch, script)
    sbatch.chmod(0o755)
    return sbatch, commands
