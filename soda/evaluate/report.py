"""results.json, per-item files, a Markdown table beside SODA's published numbers for the same size, and
report.html (soda.evaluate.html_report) to look and listen.

Everything is written atomically (temporary name, then rename) after each task, so an interrupted
run leaves the finished tasks' results readable and never a half-written file. One OUT collects the tasks of
several runs of one checkpoint: each run merges the tasks it ran into results.json and keeps the others, under
a lock on OUT/results.json.lock (so concurrent runs lose nothing), and results.md is rebuilt from the merge.
Results of another checkpoint are refused unless the run overwrites them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from pathlib import Path

from soda.evaluate.hierarchical import is_hierarchical
from soda.evaluate.hierarchical import summary as hierarchical_summary
from soda.evaluate.html_report import write_eval_page
from soda.evaluate.results import RESULTS, SODA_PUBLISHED, read_results, soda_size
from tokenize_audio.errors import SodaError
from tokenize_audio.shards import atomic_write_json, atomic_write_text

TABLE, LOCK = "results.md", "results.json.lock"

def model_summary(loaded) -> dict:
    """results.json's `model`: the family, what was loaded, its codec, shape and parameters."""
    model = loaded.model
    if is_hierarchical(model):
        return hierarchical_summary(loaded)
    total = sum(p.numel() for p in model.parameters())
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    embedding = emb.weight.numel() + (head.weight.numel() if head is not None and head.weight is not emb.weight else 0)
    c = model.config
    return {"family": "flat", "source": loaded.source, "codec": loaded.codec_label, "vocab_size": loaded.vocab.size,
            "codebooks": loaded.vocab.n_codebooks, "parameters": total, "non_embedding_parameters": total - embedding,
            "shape": {k: getattr(c, k, None) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                       "num_key_value_heads", "head_dim", "intermediate_size")},
            "soda_size": soda_size(model), "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


def encoder_projector_summary(model) -> dict:
    """results.json's `model` for the encoder-projector family: what it is built from, and its parameters: the
    trainable ones are what its training changes (projector + LoRA), counted by name since a loaded model is
    frozen."""
    c = model.config
    trainable = sum(p.numel() for n, p in model.named_parameters() if n.startswith("projector.") or "lora_" in n)
    total = sum(p.numel() for p in model.parameters())
    return {"family": "encoder-projector", "source": model.source, "encoder": c.encoder, "llm": c.llm,
            "codec": "none (Whisper log-mel features)", "pooling": c.pooling, "pool": c.pool, "trim": c.trim,
            "lora_rank": c.lora_r if model._has_lora() else None, "lora_alpha": c.lora_alpha,
            "parameters": total, "trainable_parameters": trainable,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "soda_size": None}


@contextlib.contextmanager
def locked(out: Path):
    """Hold an exclusive lock on OUT/results.json.lock: one reader-modifier-writer of results.json at a time."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes (also when the process dies)
        yield


def check_checkpoint(out: Path, checkpoint: dict) -> None:
    """Refuse (SodaError) an OUT whose results.json holds another checkpoint's results: a cheap check before loading
    the model; `claim` and `merge` check again under the lock."""
    if not (Path(out) / RESULTS).is_file():  # nothing to mix with (and OUT is not created for a run that may fail)
        return
    with locked(out):
        _check_same_checkpoint(out, read_results(out), checkpoint)


def _check_same_checkpoint(out: Path, found: dict | None, checkpoint: dict) -> None:
    recorded = (found or {}).get("checkpoint") or {}
    if found is not None and recorded.get("digest") != checkpoint["digest"]:
        was = recorded.get("path") or "a checkpoint an older soda-eval did not record"
        raise SodaError(f"--out {out}: its {RESULTS} holds results of another checkpoint ({was}), not of "
                        f"{checkpoint['path']}; use another --out, or --overwrite to replace them")


def claim(out: Path, header: dict, overwrite: bool = False) -> None:
    """Before any scoring: refuse an OUT holding another checkpoint's results, or (`overwrite`) clear them: the
    results, tables and page, each task's items, and the audio a speech task saved (OUT/TASK/*.wav; a folder left
    holding anything else is kept)."""
    out = Path(out)
    if not overwrite:
        return check_checkpoint(out, header["checkpoint"])
    with locked(out):
        try:
            found = read_results(out) or {}
        except SodaError:  # unreadable: replaced all the same
            found = {}
        for name in found.get("tasks") or {}:
            (out / "items" / f"{name}.jsonl").unlink(missing_ok=True)
            saved = out / name  # soda.evaluate.tts.judge_speech's OUT/FOLDER/ID.wav (folder = the task's name)
            if saved.is_dir() and not saved.is_symlink():
                for wav in saved.glob("*.wav"):
                    wav.unlink()
                with contextlib.suppress(OSError):  # not empty: something else lives there
                    saved.rmdir()
        (out / TABLE).unlink(missing_ok=True)
        (out / "report.html").unlink(missing_ok=True)
        atomic_write_json(out / RESULTS, {**header, "tasks": {}})


def merge(out: Path, header: dict, results: dict, tasks: dict, compare: Path | None = None) -> dict:
    """Merge `results` (task -> entry) into OUT/results.json under the lock: these tasks are replaced, the others
    kept; per-item rows (`_items`) go to items/TASK.jsonl; results.md and report.html (with `compare`'s NLL vector
    beside this one's) are rebuilt from the merge. Returns every task.
    """
    out = Path(out)
    with locked(out):
        found = read_results(out)
        _check_same_checkpoint(out, found, header["checkpoint"])
        merged = dict((found or {}).get("tasks") or {})
        for name, result in results.items():
            items = result.pop("_items", None)  # written once, then dropped from memory
            if items is not None:
                lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in items)
                atomic_write_text(out / "items" / f"{name}.jsonl", lines)
                result["items_file"] = f"items/{name}.jsonl"
            merged[name] = result
        atomic_write_json(out / RESULTS, {**header, "tasks": merged})
        atomic_write_text(out / TABLE, markdown(header, {n: r for n, r in merged.items() if n in tasks}, tasks))
        write_eval_page(out, compare)
    return merged


def record(out: Path, header: dict, name: str, result: dict, settings, seconds: float, tasks: dict,
           compare: Path | None = None, log=print) -> dict:
    """Stamp one task's entry with what it rests on (entries of several runs share one results.json: its time, the
    settings, the model family, the checkpoint, when), say its score, and merge it into OUT."""
    result["seconds"] = round(seconds, 2)
    result["settings"] = {**settings.public(), "limit": settings.limit, "family": header["model"].get("family", "flat"),
                          **result.get("settings", {})}
    result["checkpoint"] = header["checkpoint"]
    result["evaluated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    log(f"soda-eval: {name}: {result['metric']} = {_fmt(result['value'], tasks[name].percent)} "
        f"({result['count']:,} scored, {result['skipped_count']:,} skipped)")
    merge(out, header, {name: result}, tasks, compare)
    return result


def _fmt(value, percent: bool) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" if percent else f"{value:.4g}"


def markdown(header: dict, results: dict, tasks: dict) -> str:
    model = header["model"]
    size = model.get("soda_size")
    if model.get("family") == "encoder-projector":
        about = (f"Encoder-projector model: {model['encoder']} -> {model['pooling']} x{model['pool']} pooling -> "
                 f"projector -> {model['llm']} (LoRA rank {model['lora_rank'] or 'none: merged'}). Parameters: "
                 f"{model['parameters']:,} ({model['trainable_parameters']:,} trainable: projector + LoRA).")
    elif model.get("family") == "hierarchical":
        about = (f"Hierarchical model (a backbone over steps, a depth decoder over each frame's codebooks; a frame's "
                 f"likelihood is the sum over its codebooks). Codec: {model['codec']}. Parameters: "
                 f"{model['parameters']:,} (backbone {model['backbone_parameters']:,}, depth "
                 f"{model['depth_parameters']:,}; {model['non_embedding_parameters']:,} non-embedding).")
    else:
        about = (f"Codec: {model['codec']}. Parameters: {model['parameters']:,} "
                 f"({model['non_embedding_parameters']:,} non-embedding).")
    lines = [f"# soda-eval: {model['source']}", "", f"{about} Accuracies and error rates in %; ↓: lower is better.",
             ""]
    columns = ["Task", "Metric", "Result", "Items", "Skipped"] + ([f"SODA-{size}"] if size else [])
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    notes = []
    for name, r in results.items():
        task = tasks[name]
        rows = [(r["metric"] + (" ↓" if task.lower_is_better else ""), r["value"], task.percent, r["count"],
                 r["skipped_count"], task.soda_key)]
        rows += [(a["metric"], a["value"], a["percent"], a["count"], r["skipped_count"], a["soda_key"])
                 for a in r.get("also", [])]
        for metric, value, percent, count, skipped, soda_key in rows:
            row = [task.title, metric, _fmt(value, percent), f"{count:,}", f"{skipped:,}"]
            if size:
                published = SODA_PUBLISHED[size].get(soda_key) if soda_key else None
                row.append("–" if published is None else f"{published:g}")
            lines.append("| " + " | ".join(row) + " |")
        notes += _notes(task, r)
    if not size:
        lines += ["", "No SODA release has this model's shape, so no published numbers are shown beside it "
                      "(SODA published 135M, 600M, 1.7B and 4B)."]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _notes(task, r: dict) -> list[str]:
    out = []
    if r.get("by_group"):
        groups = ", ".join(f"{g} {_fmt(v['accuracy'], True)} ({v['count']})" for g, v in r["by_group"].items())
        out.append(f"- {task.title} by task: {groups}.")
    if r.get("nll_by_group"):
        vector = ", ".join(f"{g} {v:.3f}" for g, v in r["nll_by_group"].items())
        bits = r.get("bits_per_audio_second")
        out.append(f"- {task.title} (nats/token): {vector}" + (f"; {bits:.1f} bits per audio-second" if bits else "")
                   + ".")
    if r.get("audio_contribution"):
        out += _mcq_notes(task, r)
        if r.get("split"):
            s = r["split"]
            out.append(f"- {task.title} split ({s['rule']}): {s['weak']} weak, {s['strong']} strong.")
    return out


def _mcq_notes(task, r: dict) -> list[str]:
    """MCQ: the other scores of the same answers, the controls without (or with the wrong) audio, orderings."""
    ac = r["audio_contribution"]

    def pc(value) -> str:
        return _fmt(value, True)

    if r.get("settings", {}).get("mode") == "generate":
        scores = (f"official {pc(r['accuracy_official'])}"
                  + (" (MMSU's script, which drops malformed answers from the total: "
                     f"{pc(r['accuracy_official_compat'])})"
                     if "accuracy_official_compat" in r else "")
                  + f", strict {pc(r['accuracy_strict'])} ({r['malformed']} answers malformed)")
    else:
        scores = f"raw-sum {pc(r['accuracy_raw'])}" + (f", PMI {pc(r['accuracy_pmi'])}" if "accuracy_pmi" in r else "")
        if ac.get("accuracy_mismatched") is not None:
            scores += f"; with another item's clip {pc(ac['accuracy_mismatched'])}"
        if ac.get("mean_soft_score") is not None:
            scores += f"; mean log p(answer) gain from the audio over silence {ac['mean_soft_score']:.3f} nats"
    out = [f"- {task.title}: chance {pc(r['chance'])}; {scores}; with silence instead of audio "
           f"{pc(ac['accuracy_silence'])} ({ac['correct_without_audio']} items right without audio, "
           f"{ac['correct_only_with_audio']} only with it)."]
    perm = r.get("permutations") or {}
    if perm.get("requested", 1) > 1:
        out.append(f"- {task.title} over {perm['requested']} option orders: mean {pc(perm['mean_accuracy'])}, right "
                   f"under all of them {pc(perm['all_orderings_correct'])}.")
    return out
