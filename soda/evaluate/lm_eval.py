"""Text ability through EleutherAI's lm-evaluation-harness: HellaSwag (as SODA reports it) and any lm-eval task.

The model's text side is scored by lm-eval's own Hugging Face adapter (`lm_eval.models.huggingface.HFLM`), given
the loaded model and an HF tokenizer with the same ids (our export loads as a stock causal LM), so a number here
means what an lm-eval number of any HF model means: the task's prompts as plain text after BOS, no
`<|text_start|>` (lm-eval knows nothing of our specials). Both families: a hierarchical model reads text one token
per step, so its text side is itself a causal LM, handed to HFLM as a stock `Qwen3ForCausalLM` that shares its
backbone and unified head (`soda.evaluate.hierarchical.text_causal_lm`: exact, its log-probs are the family's own
scoring); results name the family like every task's. Prompt formats, few-shot counts and metrics are lm-eval's;
this module only runs it and records what the number rests on: lm-eval's version, the task's version and a hash
of its config (two runs with one hash scored the same prompts the same way).

`--tasks hellaswag` needs the hub (Rowan/hellaswag); `--lm-eval-task NAME` runs any task lm-eval knows, and
`--lm-eval-include DIR` adds task YAMLs of one's own (a local JSON dataset: `dataset_path: json` with
`dataset_kwargs: {data_files: ...}`), which is how the tests run offline.
"""

from __future__ import annotations

import hashlib
import json
import tempfile

from soda.evaluate.tasks import TASKS, Skips, Task, entry, register
from tokenize_audio.errors import SodaError, first_line

# The metric reported per task (SODA reports HellaSwag's length-normalised accuracy); others: the task's first.
METRIC = {"hellaswag": "acc_norm"}
BATCH_SIZE = 16  # lm-eval requests (prompt + one choice) per forward pass


def check_installed() -> str:
    """lm-eval's version; a one-line SodaError when it is not installed."""
    try:
        import lm_eval
    except ImportError:
        raise SodaError("lm-eval tasks need EleutherAI's lm-evaluation-harness: pip install '.[lmeval]' "
                        "(or pip install lm-eval)") from None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return getattr(lm_eval, "__version__", "unknown")


def task_manager(include: str | None):
    from lm_eval.tasks import TaskManager

    if include is not None:
        from pathlib import Path

        if not Path(include).is_dir():
            raise SodaError(f"--lm-eval-include {include}: no such directory (it holds lm-eval task YAML files)")
    return TaskManager(include_path=include)


def config_hash(config: dict) -> str:
    """sha256 of a task config as lm-eval reports it (keys sorted; functions and other objects by their text)."""
    text = json.dumps(config, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hf_tokenizer(vocab):
    """A `PreTrainedTokenizerFast` with the vocabulary's ids (written to a temporary directory and read back) that
    puts BOS before what it encodes, as the model saw every document and as SODA's Llama-3 tokenizer did (lm-eval's
    `add_bos_token` asks the tokenizer for it; it adds nothing itself)."""
    from transformers import AutoTokenizer

    from tokenize_audio.vocab import export_hf_tokenizer

    with tempfile.TemporaryDirectory(prefix="soda-lm-eval-") as tmp:
        return AutoTokenizer.from_pretrained(str(export_hf_tokenizer(vocab, f"{tmp}/tokenizer")), add_bos_token=True)


def lm_eval_task(name: str) -> str:
    """Register the lm-eval task NAME as a soda-eval task of the same name (idempotent); returns the name."""
    existing = TASKS.get(name)
    if existing is not None and existing.run is not run:
        raise SodaError(f"--lm-eval-task {name}: soda-eval has a task of that name already; run it with --tasks")
    if existing is None:
        register(Task(name=name, title=f"{name} (lm-eval)", load=lambda ctx, data: load(ctx, data, name), run=run,
                      data_help="lm-eval task (data from lm-eval's task config; --lm-eval-include DIR for local ones)",
                      soda_key=name))
    return name


def load(ctx, data: str | None, name: str) -> dict:
    """Check lm-eval, the task name and its data (lm-eval builds the task here: a download or a missing local file
    fails before any scoring)."""
    if data is not None:
        raise SodaError(f"--data-for {name}={data}: lm-eval tasks read the data their task config names; "
                        f"put a task YAML of your own in a directory and pass --lm-eval-include DIR")
    version = check_installed()
    manager = task_manager(ctx.settings.lm_eval_include)
    if name not in manager.all_tasks:
        where = f" (lm-eval {version}" + (f", with {ctx.settings.lm_eval_include})" if ctx.settings.lm_eval_include
                                          else ")")
        raise SodaError(f"--lm-eval-task {name}: lm-eval knows no such task{where}; lm-eval --tasks list shows them")
    from lm_eval.tasks import get_task_dict

    try:
        tasks = get_task_dict([name], manager)
    except Exception as err:  # noqa: BLE001 -- a hub download, a dataset script, a YAML mistake: one line
        raise SodaError(f"{name}: lm-eval could not build the task ({first_line(err, 300, with_type=True)})") from None
    return {"name": name, "version": version, "tasks": tasks, "manager": manager}


def harness_model(model, vocab, max_len: int):
    """lm-eval's `HFLM` on a model's text side: the flat model itself, or a hierarchical model's
    `soda.evaluate.hierarchical.text_causal_lm` (a causal LM sharing its backbone and unified head); the tokenizer
    and its BOS handling are the same for both families."""
    from lm_eval.models.huggingface import HFLM

    from soda.evaluate.hierarchical import is_hierarchical, text_causal_lm

    lm = text_causal_lm(model) if is_hierarchical(model) else model
    return HFLM(pretrained=lm, tokenizer=hf_tokenizer(vocab), batch_size=BATCH_SIZE, max_length=max_len,
                add_bos_token=True)


def run(ctx, loaded: dict) -> dict:
    import lm_eval

    name = loaded["name"]
    model = harness_model(ctx.loaded.model, ctx.vocab, ctx.settings.max_len)
    out = lm_eval.simple_evaluate(model=model, tasks=list(loaded["tasks"].values()),
                                  task_manager=loaded["manager"], limit=ctx.settings.limit, log_samples=True,
                                  bootstrap_iters=0, random_seed=ctx.settings.seed,
                                  numpy_random_seed=ctx.settings.seed, torch_random_seed=ctx.settings.seed,
                                  fewshot_random_seed=ctx.settings.seed)
    scores = out["results"][name]
    metrics = [k.split(",")[0] for k in scores if "," in k and "_stderr" not in k]
    metric = METRIC.get(name) if METRIC.get(name) in metrics else (metrics[0] if metrics else None)
    if metric is None:
        raise SodaError(f"{name}: lm-eval returned no metric ({', '.join(scores) or 'nothing'})")
    key = next(k for k in scores if k.split(",")[0] == metric)
    config = out["configs"][name]
    samples = out.get("samples", {}).get(name, [])
    count = int(out.get("n-samples", {}).get(name, {}).get("effective", len(samples)))
    items = [{"doc_id": s.get("doc_id"), "target": str(s.get("target")),
              **{m: s[m] for m in metrics if isinstance(s.get(m), (int, float))}} for s in samples]
    return entry(metric, float(scores[key]), count, Skips(), {"harness": "lm-eval", "num_fewshot": config.get(
        "num_fewshot"), "include_path": ctx.settings.lm_eval_include, "add_bos_token": True},
        lm_eval={"version": loaded["version"], "task_version": out.get("versions", {}).get(name),
                 "config_hash": config_hash(config), "metrics": {k: v for k, v in scores.items() if k != "alias"},
                 "dataset": {k: config.get(k) for k in ("dataset_path", "dataset_name", "test_split",
                                                          "validation_split")}},
        _items=items)


def load_hellaswag(ctx, data):
    return load(ctx, data, "hellaswag")


register(Task(name="hellaswag", title="HellaSwag (lm-eval)", load=load_hellaswag, run=run, soda_key="hellaswag",
              data_help="lm-eval's hellaswag (Rowan/hellaswag from the hub, 0-shot, acc_norm as SODA); "
                        "other lm-eval tasks: --lm-eval-task NAME"))
