"""Text ability through lm-evaluation-harness, offline: a tiny HellaSwag-format task from a local JSON file, on the
flat family and on the hierarchical one (whose harness log-likelihoods are its own scoring's)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from soda.checkpoints import load_model  # noqa: E402
from soda.evaluate.cli import main  # noqa: E402

# HellaSwag's own fields (ctx, endings, label as a string), a few rows.
ROWS = [
    {"ctx": "The cat sat on the", "endings": [" mat.", " moon, singing loudly.", " idea", " 7"], "label": "0"},
    {"ctx": "She opened the door and", "endings": [" walked in.", " blue", " the the", " zzz qqq"], "label": "0"},
    {"ctx": "Water boils at one hundred", "endings": [" apples", " degrees.", " run", " ,,"], "label": "1"},
    {"ctx": "He read the book", "endings": [" quickly", " sky", " under the table of numbers", " ?"], "label": "0"},
    {"ctx": "The sun rises in the", "endings": [" west", " kitchen", " east.", " car"], "label": "2"},
]


def local_task(tmp_path, name="tiny_hellaswag"):
    folder = tmp_path / "lm_eval_tasks"
    folder.mkdir()
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "output_type: multiple_choice\n"
        "validation_split: validation\n"
        'doc_to_text: "{{ctx}}"\n'
        'doc_to_choice: "{{endings}}"\n'
        'doc_to_target: "{{label | int}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
        "metadata:\n  version: 1.0\n")
    return folder


def flat_log_prob(loaded, ctx: list[int], cont: list[int]) -> float:
    """log p(cont | ctx) from the flat model's logits."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def hierarchical_log_prob(loaded, ctx: list[int], cont: list[int]) -> float:
    """log p(cont | ctx) as the hierarchical family scores every task (`hierarchical_log_probs`), not lm-eval."""
    from soda.evaluate.hierarchical import hierarchical_log_probs

    mask = np.zeros(len(ctx) + len(cont), dtype=bool)
    mask[len(ctx):] = True
    return float(hierarchical_log_probs(loaded.model, loaded.vocab, [np.array(ctx + cont)], [mask])[0].sum())


def hand_scores(loaded, log_prob=flat_log_prob, encode=None) -> tuple[float, float]:
    """acc and acc_norm by hand, as lm-eval asks them: BOS + context, then the sum of the log-probs of the ending after
    the task's target delimiter (a space: lm-eval scores " " + ending; the byte tokenizer encodes a string's parts
    independently, so the ids just concatenate); acc_norm divides by the ending's length without the delimiter.
    `encode(context, continuation) -> (ids, ids)` replaces that encoding (e.g. lm-eval's own, `HFLM._encode_pair`)."""
    vocab = loaded.vocab
    encode = encode or (lambda c, e: ([vocab.bos_id, *vocab.encode_text(c).tolist()], vocab.encode_text(e).tolist()))
    acc = norm = 0
    for row in ROWS:
        scores = []
        for ending in row["endings"]:
            lp = log_prob(loaded, *encode(row["ctx"], " " + ending))
            scores.append((lp, lp / len(ending)))
        acc += int(np.argmax([s[0] for s in scores])) == int(row["label"])
        norm += int(np.argmax([s[1] for s in scores])) == int(row["label"])
    return acc / len(ROWS), norm / len(ROWS)


def test_lm_eval_task_on_a_local_set_matches_hand_scoring_and_records_version_and_config_hash(tiny_run, tmp_path,
                                                                                                  capsys):
    import lm_eval

    folder, out, words = local_task(tmp_path), tmp_path / "eval", tmp_path / "words.jsonl"
    words.write_text(json.dumps({"good": "the cat sat", "bad": "teh cta sat"}) + "\n")
    assert main([str(tiny_run), "--tasks", "twuggy", "--lm-eval-task", "tiny_hellaswag", "--lm-eval-include",
                 str(folder), "--data-for", f"twuggy={words}", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    r = json.loads((out / "results.json").read_text())["tasks"]
    assert set(r) == {"twuggy", "tiny_hellaswag"}  # lm-eval tasks sit beside SODA's
    t = r["tiny_hellaswag"]
    acc, acc_norm = hand_scores(load_model(str(tiny_run), device="cpu"))
    assert t["metric"] == "acc" and t["count"] == len(ROWS)  # not hellaswag: the task's first metric
    assert t["value"] == pytest.approx(acc) and t["lm_eval"]["metrics"]["acc_norm,none"] == pytest.approx(acc_norm)
    assert t["lm_eval"]["version"] == lm_eval.__version__ and t["lm_eval"]["task_version"] == 1.0
    assert len(t["lm_eval"]["config_hash"]) == 64
    assert len((out / "items" / "tiny_hellaswag.jsonl").read_text().splitlines()) == len(ROWS)
    assert "tiny_hellaswag (lm-eval)" in (out / "results.md").read_text()

    # the same task again: the same config hash; a changed prompt: another
    again = tmp_path / "again"
    assert main([str(tiny_run), "--lm-eval-task", "tiny_hellaswag", "--lm-eval-include", str(folder), "--out",
                 str(again), "--quiet", "--device", "cpu", "--limit", "2"]) == 0
    second = json.loads((again / "results.json").read_text())["tasks"]["tiny_hellaswag"]
    assert second["lm_eval"]["config_hash"] == t["lm_eval"]["config_hash"] and second["count"] == 2
    yaml = folder / "tiny_hellaswag.yaml"
    yaml.write_text(yaml.read_text().replace('"{{ctx}}"', '"Q: {{ctx}}"'))
    assert main([str(tiny_run), "--lm-eval-task", "tiny_hellaswag", "--lm-eval-include", str(folder), "--out",
                 str(again), "--quiet", "--device", "cpu", "--limit", "2"]) == 0
    third = json.loads((again / "results.json").read_text())["tasks"]["tiny_hellaswag"]
    assert third["lm_eval"]["config_hash"] != t["lm_eval"]["config_hash"]


def test_hellaswag_reports_acc_norm_beside_sodas_published_number():
    from soda.evaluate import report
    from soda.evaluate.tasks import available

    tasks = available()
    assert "hellaswag" in tasks and "Rowan/hellaswag" in tasks["hellaswag"].data_help
    header = {"model": {"source": "m", "codec": "mimi", "parameters": 1, "non_embedding_parameters": 1,
                        "soda_size": "4B"}}
    result = {"metric": "acc_norm", "value": 0.5, "count": 10, "skipped_count": 0}
    assert "| HellaSwag (lm-eval) | acc_norm | 50.0 | 10 | 0 | 52.6 |" in report.markdown(
        header, {"hellaswag": result}, tasks)


def test_lm_eval_mistakes_are_one_line_errors(tiny_run, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "eval")

    def error(*args) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main([str(tiny_run), *args, "--out", out, "--quiet", "--device", "cpu"])
        assert exit_info.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # lm-eval's own log lines come before it
        assert last.startswith("soda-eval: error: "), last
        return last.removeprefix("soda-eval: error: ")

    assert "lm-eval knows no such task" in error("--lm-eval-task", "no_such_task_xyz")
    assert "no such directory" in error("--lm-eval-task", "x", "--lm-eval-include", str(tmp_path / "missing"))
    assert "already" in error("--lm-eval-task", "twuggy")
    # offline, the real HellaSwag cannot be downloaded: one line, before any scoring
    assert error("--tasks", "hellaswag").startswith("hellaswag: lm-eval could not build the task")
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert "pip install '.[lmeval]'" in error("--tasks", "hellaswag")
    assert not (tmp_path / "eval" / "results.json").exists()


# --------------------------------------------------------------------------------------------
# The hierarchical family
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hier_export(tmp_path_factory):
    """A tiny hierarchical model (test_hierarchical_eval's) written as soda-train export writes one: config.json,
    model.safetensors and the vocabulary."""
    from test_hierarchical_eval import K, tiny_model

    from soda.hierarchical import save_export
    from tokenize_audio.vocab import Vocabulary, byte_tokenizer

    vocab = Vocabulary.build(byte_tokenizer(), K, 2048)
    model = tiny_model(vocab, seed=1)
    folder = tmp_path_factory.mktemp("hier-lm-eval") / "export"
    folder.mkdir()
    save_export(model.config, model.state_dict(), folder)
    vocab.save(folder)
    return folder


def test_the_harness_scores_a_hierarchical_models_text_as_the_family_itself_does(hier_export):
    import torch
    from lm_eval.api.instance import Instance

    from soda.evaluate.hierarchical import is_hierarchical
    from soda.evaluate.lm_eval import harness_model

    loaded = load_model(str(hier_export), device="cpu", hierarchical=True)
    model, vocab = loaded.model, loaded.vocab
    assert is_hierarchical(model)
    head = model.unified_head.weight.detach().clone()
    harness = harness_model(model, vocab, 64)
    # the adapter shares the model's modules, and lm-eval's tie_weights() left the unified head its own
    assert harness.model.model is model.backbone and harness.model.lm_head is model.unified_head
    assert torch.equal(model.unified_head.weight, head) and harness.prefix_token_id == vocab.bos_id
    # every request's context starts with BOS, as every training document did (and SODA's tokenizer adds it)
    assert harness._encode_pair("The cat sat", " on the mat")[0][0] == vocab.bos_id
    assert harness.tok_encode("The cat")[0] == vocab.bos_id
    # the ids lm-eval scores (its own encoding of context and continuation, the flat family's: one tokenizer), each
    # request's log-likelihood as the family's own scoring gives it; a batch of 16 right-padded requests per forward
    pairs = [(row["ctx"], " " + e) for row in ROWS for e in row["endings"]]
    got = harness.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)],
                                disable_tqdm=True)
    want = [hierarchical_log_prob(loaded, *harness._encode_pair(c, e)) for c, e in pairs]
    assert np.allclose([g[0] for g in got], want, rtol=0, atol=1e-5)
    # a whole text (perplexity tasks): every token after lm-eval's prefix token, BOS
    texts = [row["ctx"] for row in ROWS]
    rolling = harness.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                             for i, t in enumerate(texts)], disable_tqdm=True)
    assert np.allclose(rolling, [hierarchical_log_prob(loaded, [vocab.bos_id], harness.tok_encode(t)) for t in texts],
                       rtol=1e-6, atol=1e-5)  # sums over ~40 tokens of fp32


def test_generation_tasks_decode_the_hierarchical_models_greedy_text(hier_export):
    """lm-eval's generate_until (transformers' generate with its KV cache, two prompts left-padded into one batch)
    gives the hierarchical model's own greedy continuation: the unified head's argmax over the backbone, step by
    step, no cache, each prompt alone."""
    import torch
    from lm_eval.api.instance import Instance

    from soda.evaluate.lm_eval import harness_model

    loaded = load_model(str(hier_export), device="cpu", hierarchical=True)
    model, vocab = loaded.model, loaded.vocab
    harness = harness_model(model, vocab, 64)
    prompts, new = ["The cat sat on the", "Water"], 6
    got = harness.generate_until([Instance("generate_until", {}, (p, {"until": ["\x00"], "max_gen_toks": new}), i)
                                  for i, p in enumerate(prompts)], disable_tqdm=True)
    for prompt, text in zip(prompts, got):
        ids = harness.tok_encode(prompt)
        start = len(ids)
        for _ in range(new):
            codes = torch.full((1, len(ids), model.config.shape.n_codebooks), -1)
            codes[0, :, 0] = torch.tensor(ids)
            with torch.no_grad():
                hidden = model.backbone_hidden(codes, torch.zeros(1, len(ids), dtype=torch.long))
            ids.append(int(model.unified_head(hidden[0, -1]).argmax()))
            if ids[-1] == vocab.eos_id:
                break
        assert text == harness.tok_decode(ids[start:]), prompt


def test_an_lm_eval_task_runs_on_a_hierarchical_export_through_soda_eval_and_names_the_family(hier_export, tmp_path):
    folder, out = local_task(tmp_path), tmp_path / "eval"
    assert main([str(hier_export), "--lm-eval-task", "tiny_hellaswag", "--lm-eval-include", str(folder), "--out",
                 str(out), "--quiet", "--device", "cpu"]) == 0
    written = json.loads((out / "results.json").read_text())
    t = written["tasks"]["tiny_hellaswag"]
    assert written["model"]["family"] == "hierarchical" and t["settings"]["family"] == "hierarchical"
    assert t["settings"]["harness"] == "lm-eval" and t["settings"]["add_bos_token"] is True
    # acc by the family's own scoring of the ids lm-eval asks about (the exact log-likelihoods: the test above)
    from soda.evaluate.lm_eval import harness_model

    loaded = load_model(str(hier_export), device="cpu", hierarchical=True)
    acc, acc_norm = hand_scores(loaded, hierarchical_log_prob,
                                harness_model(loaded.model, loaded.vocab, 64)._encode_pair)
    assert t["metric"] == "acc" and t["count"] == len(ROWS)
    assert t["value"] == pytest.approx(acc) and t["lm_eval"]["metrics"]["acc_norm,none"] == pytest.approx(acc_norm)
    assert len((out / "items" / "tiny_hellaswag.jsonl").read_text().splitlines()) == len(ROWS)
