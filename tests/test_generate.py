"""soda.generate / soda-generate: prompts, codebook-aware decoding, KV cache, stopping, the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import write_wave

from soda.checkpoints import LoadedModel, load_model
from soda.generate.cli import main
from soda.generate.decode import generate, silence_codes, synthesize, transcribe
from soda.generate.prompts import ENDINGS, GenerationSettings, Request, build_plan, summarize
from soda.model import build_model
from soda.shape import ModelShape
from tokenize_audio.vocab import Vocabulary, byte_tokenizer

K, CODES = 8, 64  # small codebooks: out-of-place ids hold most of a random model's probability mass


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.build(byte_tokenizer(), K, CODES)


def random_model(vocab, seed: int) -> LoadedModel:
    torch.set_num_threads(1)
    model = build_model(ModelShape(64, 2, 2, 1, 32, 192, vocab=vocab.size), vocab, seed=seed).eval()
    return LoadedModel(model, vocab, None, "none", f"random seed {seed}", torch.device("cpu"))


def mixed_requests(seed: int, n: int = 12) -> list[Request]:
    rng = np.random.default_rng(seed)
    codes = lambda: rng.integers(0, CODES, (K, int(rng.integers(1, 12))))  # noqa: E731
    make = [
        lambda: Request("tts", text="hello world"[: int(rng.integers(1, 12))]),
        lambda: Request("tts", text="hi there", voice_audio=codes(), voice_text="a voice"),
        lambda: Request("asr", audio=codes()),
        lambda: Request("continue", audio=codes(), max_seconds=1.0),
        lambda: Request("s2st", audio=codes(), source_language="fr", source_text="bonjour"),
        lambda: Request("s2st", audio=codes(), source_language="de"),
    ]
    return [make[i % len(make)]() for i in range(n)]


def check_ids(vocab, task: str, ids: list[int]) -> tuple[int, int]:
    """An independent reading of the generated flat ids: text only in text segments, audio only as whole frames in
    codebook order, <|audio_end|> only between frames. Returns (text ids, frames) seen."""
    mode = {"asr": "text", "s2st": "text", "instruct": "text"}.get(task, "audio")
    pos, texts = 0, 0
    for i in ids:
        if i in (vocab.text_start, vocab.audio_start):
            assert mode == "between", (task, ids)
            mode, pos = ("text" if i == vocab.text_start else "audio"), 0
        elif i in (vocab.text_end, vocab.audio_end):
            assert mode == ("text" if i == vocab.text_end else "audio"), (task, ids)
            assert i == vocab.text_end or pos % vocab.n_codebooks == 0, "audio closed mid-frame"
            mode = "between"
        elif mode == "audio":
            assert vocab.codebook_of(np.array([i]))[0] == pos % vocab.n_codebooks, f"id {i} at frame position {pos % vocab.n_codebooks}"
            pos += 1
        else:
            assert mode == "text" and 0 <= i < vocab.text_size and i not in (vocab.bos_id, vocab.eos_id), (task, i)
            texts += 1
    assert mode != "audio" or pos % vocab.n_codebooks == 0, "audio stopped mid-frame"
    return texts, pos // vocab.n_codebooks


def test_prompts_are_sodas(vocab):
    codes = np.arange(16).reshape(K, 2) % CODES
    audio = "".join(vocab.audio_char(i) for i in vocab.codes_to_ids(codes))
    s = lambda r: vocab.ids_to_string(build_plan(vocab, r, {"audio": codes, "voice_audio": codes}).prompt)  # noqa
    assert s(Request("continue", audio=codes)) == f"<|begin_of_text|><|audio_start|>{audio}"
    assert s(Request("asr", audio=codes)) == f"<|begin_of_text|><|audio_start|>{audio}<|audio_end|><|text_start|>"
    assert s(Request("tts", text="Hi.")) == "<|begin_of_text|><|text_start|>Hi.<|text_end|><|audio_start|>"
    assert s(Request("tts", text="Hi.", voice_audio=codes, voice_text="Me.")) == (
        f"<|begin_of_text|><|text_start|>Me.<|text_end|><|audio_start|>{audio}<|audio_end|>"
        "<|text_start|>Hi.<|text_end|><|audio_start|>")
    assert s(Request("s2st", audio=codes, source_language="fr", source_text="Salut.")) == (
        f"<|begin_of_text|><|audio_start|>{audio}<|audio_end|><|text_start|><language>fr</language>Salut."
        "<|text_end|><|text_start|><language>en</language>")


def test_constrained_decoding_never_emits_an_out_of_place_id(vocab):
    settings = GenerationSettings(temperature=1.5, text_temperature=1.5, top_k=0, max_seconds=1.5, max_text_tokens=24,
                        batch_size=12)
    checked = 0
    for seed in range(4):
        loaded = random_model(vocab, seed)
        requests = mixed_requests(seed)
        # Unconstrained, these models would mostly emit ids of the wrong kind.
        plan = build_plan(vocab, requests[0], {})
        with torch.no_grad():
            probs = loaded.model(torch.tensor([plan.prompt])).logits[0, -1].softmax(-1)
        assert probs[vocab.audio_base: vocab.audio_base + CODES].sum() < 0.5
        for r, res in zip(requests, generate(loaded, requests, GenerationSettings(**{**vars(settings), "seed": seed}))):
            check_ids(vocab, r.task, res.ids)
            if res.codes is not None:
                assert res.codes.shape[0] == K and res.codes.min(initial=0) >= 0 and res.codes.max(initial=0) < CODES
            checked += len(res.ids)
    assert checked > 4_000


def test_kv_cache_and_full_recompute_give_identical_greedy_outputs(vocab):
    loaded = random_model(vocab, 7)
    requests = mixed_requests(7, n=6)
    greedy = dict(temperature=0, max_seconds=1.2, max_text_tokens=16, batch_size=3)
    cached = generate(loaded, requests, GenerationSettings(**greedy))
    full = generate(loaded, requests, GenerationSettings(**greedy, use_cache=False))
    alone = generate(loaded, requests, GenerationSettings(**{**greedy, "batch_size": 1}))  # no left padding
    assert [r.ids for r in cached] == [r.ids for r in full] == [r.ids for r in alone]
    assert [r.ended for r in cached] == [r.ended for r in full]
    assert sum(len(r.ids) for r in cached) > 500


def test_sampling_is_seeded(vocab):
    loaded = random_model(vocab, 3)
    requests = [Request("tts", text="abc")] * 3
    run = lambda **kw: [r.ids for r in generate(loaded, requests, GenerationSettings(max_seconds=0.8, **kw))]  # noqa: E731
    assert run(seed=1, temperature=1.0, top_p=0.9) == run(seed=1, temperature=1.0, top_p=0.9)
    assert run(seed=1, temperature=1.0) != run(seed=2, temperature=1.0)
    assert run(seed=1, temperature=1.0, top_k=1) == run(temperature=0)  # top-1 sampling is greedy


def test_random_models_terminate_on_every_prompt_under_the_caps(vocab):
    settings = dict(max_seconds=2.0, max_text_tokens=20, cap_base_seconds=0.4, cap_seconds_per_char=0.1,
                    batch_size=12)
    results, requests = [], []
    for seed in range(3):
        loaded = random_model(vocab, 10 + seed)
        reqs = mixed_requests(seed, n=12)
        out = generate(loaded, reqs, GenerationSettings(**settings, seed=seed, temperature=1.2, text_temperature=1.0))
        results += out
        requests += reqs
    assert len(results) == 36 and all(r.ended in ENDINGS for r in results)
    for r, req in zip(results, requests):
        text_tokens = sum(1 for i in r.ids if i < vocab.text_size)
        tag = len(vocab.encode_text("<language>en</language>"))  # forced before the translation
        assert text_tokens <= {"asr": 20, "s2st": 20 if req.source_text else 40 + tag}.get(req.task, 0)
        if req.task == "tts":
            cap = min(2.0, 0.4 + 0.1 * len(req.text))
            assert r.seconds <= cap + 1e-9
            assert r.ended in ("audio_end", "text_length_cap") if cap < 2.0 else r.ended != "text_length_cap"
        elif req.task == "continue":
            assert r.seconds <= 1.0 and r.ended in ("audio_end", "max_seconds")
        elif req.task == "asr":
            assert r.ended in ("text_end", "max_tokens") and r.codes is None
        else:  # s2st: text first, then audio; the audio cap follows the translation's length
            assert r.phase_endings[0] in ("text_end", "max_tokens") and r.phase_endings[-1] == r.ended
            assert len(r.phase_endings) == (2 if req.source_text else 3)
            assert r.seconds <= min(2.0, 0.4 + 0.1 * len(r.text)) + 1e-9
    summary = summarize(results)
    assert summary["outputs"] == 36 and sum(summary["ended"].values()) == 36
    assert 0 <= summary["termination_rate"] <= 1


def test_s2st_forces_the_audio_after_the_translation(vocab):
    loaded = random_model(vocab, 5)
    res = generate(loaded, [Request("s2st", audio=np.zeros((K, 3), np.int64), source_language="fr",
                                    source_text="oui")],
                   GenerationSettings(temperature=0, max_text_tokens=5, max_seconds=1))[0]
    ids = res.ids
    end = ids.index(vocab.text_end)  # closes the translation (forced when capped), then <|audio_start|> is forced
    assert ids[end + 1] == vocab.audio_start and res.text == vocab.decode_text(ids[:end])
    assert res.codes.shape[1] * K == sum(1 for i in ids[end + 2:] if i >= vocab.audio_base) > 0


def test_silence_run_stops_generation_and_is_cut(vocab, mimi):
    loaded = random_model(vocab, 2)
    everything_silent = frozenset(range(CODES))
    res = generate(loaded, [Request("tts", text="a long enough text to speak")] * 4,
                   GenerationSettings(silence_codes=everything_silent, silence_seconds=0.4, max_seconds=3, seed=0))
    stopped = [r for r in res if r.ended == "silence"]
    assert stopped and all(r.seconds == 0 and len([i for i in r.ids if i >= vocab.audio_base]) == 5 * K
                           for r in stopped)
    # With a codec, silence is what it makes of digital silence and near-silent noise.
    codes = silence_codes(mimi)
    assert set(mimi.encode(np.zeros(mimi.samples_per_frame * 20, np.float32))[0, 5:].tolist()) <= codes
    assert len(codes) < mimi.codebook_size // 10


def test_trained_run_with_codec_helpers(tiny_run, mimi, demo_waves):
    loaded = load_model(str(tiny_run), device="cpu")
    settings = GenerationSettings(max_seconds=1.0, max_text_tokens=12)
    texts = transcribe(loaded, mimi, demo_waves[:2], settings)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    waves, ended = synthesize(loaded, mimi, ["Hello.", "Good day."], [(demo_waves[2], "A voice."), None], settings)
    assert len(waves) == 2 and all(e in ENDINGS for e in ended)
    for w in waves:
        assert w.dtype == np.float32 and len(w) % mimi.samples_per_frame == 0
        assert len(w) <= mimi.sample_rate * 1.0


def test_cli_batch_writes_waves_results_and_summary(tiny_run, demo_waves, tmp_path, capsys):
    wav = write_wave(tmp_path / "in" / "speech.wav", demo_waves[0], 24000)
    rows = [{"task": "tts", "text": "Hello.", "voice": "in/speech.wav", "voice_text": "Some words.", "id": "hi"},
            {"task": "asr", "audio": str(wav)},
            {"task": "continue", "audio": "in/speech.wav", "max_seconds": 0.5},
            {"task": "s2st", "audio": "in/speech.wav", "source_language": "fr", "source_text": "Bonjour."}]
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "gen"
    assert main([str(tiny_run), "batch", str(jsonl), "--out", str(out), "--max-seconds", "1", "--max-text-tokens",
                 "10", "--batch-size", "2"]) == 0
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == ["hi", "00001", "00002", "00003"]
    assert all(r["ended"] in ENDINGS for r in results) and results[1]["wav"] is None
    for r in results[:1] + results[2:]:
        wave, sr = sf.read(r["wav"])
        assert sr == 24000 and abs(len(wave) / sr - r["seconds"]) < 1e-6 and r["seconds"] <= 1.0
    assert results[2]["seconds"] <= 0.5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"] == 4 and "termination_rate" in summary and "RANDOM" in summary["codec"]
    assert "4 outputs" in capsys.readouterr().err


def test_cli_single_asr_prints_the_transcript(tiny_run, demo_waves, tmp_path, capsys):
    wav = write_wave(tmp_path / "speech.wav", demo_waves[1], 16000)  # resampled to the codec's rate
    assert main([str(tiny_run), "asr", str(wav), "--out", str(tmp_path / "o"), "--max-text-tokens", "5"]) == 0
    line = json.loads((tmp_path / "o" / "results.jsonl").read_text())
    assert line["id"] == "asr" and repr(line["text"]) in capsys.readouterr().out


@pytest.mark.parametrize("lines, message", [
    (['{"task": "asr", "audio": "missing.wav"}'], "requests.jsonl:1: audio file not found: missing.wav"),
    (['', '{"task": "tts", "text": "a"}', '{"task": "tts"'], "requests.jsonl:3: not valid JSON"),
    (['{"task": "sing", "text": "a"}'], "requests.jsonl:1: task 'sing'"),
    (['{"task": "tts", "txt": "a"}'], "requests.jsonl:1: unknown field txt"),
    (['{"task": "continue", "audio": "requests.jsonl", "max_seconds": "5"}'], "max_seconds must be a positive"),
    (['{"task": "tts", "text": 5}'], "requests.jsonl:1: text must be a string"),
    (['{"task": "tts", "text": "a"}', '{"task": "s2st", "audio": "requests.jsonl"}'],
     "requests.jsonl:2: s2st request 00001 needs source_language"),
    (['{"task": "tts", "text": "a", "id": "x"}', '{"task": "tts", "text": "b", "id": "x"}'], "repeats line 1"),
])
def test_cli_bad_requests_are_one_line_errors(tmp_path, capsys, lines, message):
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exit_:
        main(["no-model-needed", "batch", str(jsonl)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_bad_task_and_missing_inputs(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tiny_run), "sing", "x"])
    assert exit_.value.code == 2 and "invalid choice: 'sing'" in capsys.readouterr().err
    for argv, message in [([str(tiny_run), "asr", str(tmp_path / "none.wav")], "audio file not found"),
                          ([str(tiny_run), "s2st", __file__], "needs --source-language"),
                          ([str(tiny_run), "tts", "hi", "--voice-text", "x"], "--voice and --voice-text go together"),
                          ([str(tmp_path / "nothing"), "tts", "hi"], "no such checkpoint")]:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("bad, said", [
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"top_p": 2.0}, "top_p 2.0: must be in (0, 1]"),
    ({"batch_size": 0}, "batch_size, max_text_tokens and max_seconds must be positive"),
    ({"cap_seconds_per_char": -0.1}, "cap_seconds_per_char and silence_seconds must be >= 0"),
    ({"silence_seconds": -1}, "cap_seconds_per_char and silence_seconds must be >= 0"),
])
def test_nonsense_settings_are_refused(bad, said):
    from tokenize_audio.errors import SodaError

    with pytest.raises(SodaError, match=re.escape(said)):
        GenerationSettings(**bad)


# --- outputs that survive a kill and a second run -------------------------------------------------------
def _batch(tmp_path, demo_waves, n: int = 7) -> list[str]:
    """A requests file (TTS and ASR, so some lines have no wav) and the argv of a small `batch` run."""
    wav = write_wave(tmp_path / "in" / "speech.wav", demo_waves[0][:24000], 24000)
    rows = [{"task": "asr", "audio": str(wav), "id": f"r{i}"} if i % 3 == 2 else
            {"task": "tts", "text": "Hello there, friend."[: 5 + i], "id": f"r{i}"} for i in range(n)]
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [str(jsonl), "--out", str(tmp_path / "gen"), "--max-seconds", "0.4", "--max-text-tokens", "4",
            "--batch-size", "2", "--silence-seconds", "0", "--quiet"]


@pytest.fixture
def decoded(monkeypatch):
    """Counts the requests decoded; `decoded.fail_after = k` raises (a kill) when batch k+1 starts."""
    import soda.generate.decode as G

    real = G.decode_batch
    state = SimpleNamespace(requests=0, batches=0, fail_after=None)

    def counting(model, vocab, plans, *args, **kwargs):
        if state.fail_after is not None and state.batches >= state.fail_after:
            raise RuntimeError("killed")
        state.batches += 1
        state.requests += len(plans)
        return real(model, vocab, plans, *args, **kwargs)

    monkeypatch.setattr(G, "decode_batch", counting)
    return state


def test_a_killed_batch_keeps_every_finished_request_and_a_rerun_does_only_the_rest(tiny_run, demo_waves, tmp_path,
                                                                                   decoded, capsys):
    argv = [str(tiny_run), "batch", *_batch(tmp_path, demo_waves)]
    out = tmp_path / "gen"
    decoded.fail_after = 2  # killed during the third of four batches
    with pytest.raises(RuntimeError, match="killed"):
        main(argv)
    finished = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(finished) == 4 and not (out / "summary.json").exists()
    stamps = {}
    for line in finished:  # each line's wav was written before it
        if line["task"] == "tts":
            stamps[line["id"]] = Path(line["wav"]).stat().st_mtime_ns
            assert sf.read(line["wav"])[0].size > 0
    decoded.fail_after, decoded.requests = None, 0
    assert main(argv) == 0
    assert decoded.requests == 3  # only the unfinished requests were generated again
    assert "4 of 7 requests already done" in capsys.readouterr().err
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [f"r{i}" for i in range(7)]  # request order at the end
    assert [x for x in lines if x["id"] in {f["id"] for f in finished}] == \
        sorted(finished, key=lambda x: x["index"])  # kept as they were
    assert all(Path(x["wav"]).stat().st_mtime_ns == stamps[x["id"]] for x in lines if x["id"] in stamps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"] == 7 and summary["kept_from_earlier_runs"] == 4 and summary["generated_now"] == 3
    # a third run has nothing to do
    decoded.requests = 0
    assert main(argv) == 0 and decoded.requests == 0


def test_a_rerun_with_other_settings_is_refused_unless_overwrite(tiny_run, demo_waves, tmp_path, decoded, capsys):
    argv = [str(tiny_run), "batch", *_batch(tmp_path, demo_waves, n=3)]
    out = tmp_path / "gen"
    assert main(argv) == 0
    before = (out / "results.jsonl").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--seed", "3"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "seed 0, not 3" in err and "--overwrite" in err
    assert (out / "results.jsonl").read_text() == before
    assert main(argv + ["--batch-size", "3"]) == 0  # how fast, not what: resumed (nothing left to do)
    decoded.requests = 0
    assert main(argv + ["--seed", "3", "--overwrite"]) == 0 and decoded.requests == 3
    assert json.loads((out / "summary.json").read_text())["settings"]["seed"] == 3
    # an edited request is generated again; the others are kept
    jsonl = Path(argv[2])
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    rows[0]["text"] = "Something else."
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    decoded.requests = 0
    assert main(argv + ["--seed", "3"]) == 0 and decoded.requests == 1


@pytest.mark.slow
def test_sigkill_midway_then_rerun_completes_the_batch(tiny_run, demo_waves, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    argv = [str(tiny_run), "batch", *_batch(tmp_path, demo_waves, n=24)]
    argv[argv.index("--batch-size") + 1] = "1"
    out = tmp_path / "gen"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "soda.generate", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "results.jsonl").is_file() and len((out / "results.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()
                if line.endswith("}")]
    assert 3 <= len(finished) < 24
    for line in finished:
        assert line["wav"] is None or sf.read(line["wav"])[0].size > 0
    assert main(argv) == 0
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [f"r{i}" for i in range(24)]
    assert json.loads((out / "summary.json").read_text())["kept_from_earlier_runs"] >= len(finished)


def test_a_requests_file_with_a_utf8_bom_is_read(tmp_path, capsys):
    jsonl = tmp_path / "requests.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps({"task": "tts", "text": "Hi.", "id": "a"}).encode() + b"\n")
    with pytest.raises(SystemExit):  # the requests are read; the checkpoint is what is missing
        main([str(tmp_path / "no-model"), "batch", str(jsonl), "--out", str(tmp_path / "gen")])
    err = capsys.readouterr().err
    assert "no such checkpoint" in err and "not valid JSON" not in err
