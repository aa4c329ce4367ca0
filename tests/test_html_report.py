"""OUT/report.html (soda-eval) and RUN/report.html (soda-train): built from small hand-written outputs, then opened
from disk in headless Chromium (no console errors, every <audio> playable, a non-blank screenshot)."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from soda.evaluate.html_report import write_eval_page
from soda.evaluate.report import RESULTS
from soda.html import ITEM_LIMIT

SR = 16000


def _wav(path: Path, seconds: float = 0.5, freq: float = 220.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(SR * seconds)) / SR
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), SR)
    return path


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _eval_out(root: Path, name: str = "eval", nll_scale: float = 1.0, n_tts: int = 2) -> Path:
    """A soda-eval OUT as soda-eval writes it: results.json, items/TASK.jsonl, tts/ and s2st/ wavs."""
    out = root / name
    voices = root / "data"
    prompts = [{"id": f"t{i}", "text": f"hello number {i}", "voice_audio": f"v{i}.wav", "voice_text": "a voice"}
               for i in range(n_tts)]
    for i in range(n_tts):
        _wav(voices / f"v{i}.wav", freq=300 + 20 * i)
        _wav(out / "tts" / f"t{i}.wav", freq=440)
    _jsonl(voices / "tts.jsonl", prompts)
    _jsonl(out / "items" / "tts.jsonl", [{"id": f"t{i}", "text": f"hello number {i}", "transcript": "hello number",
                                          "ended": "audio_end", "seconds": 0.5, "similarity": 0.4}
                                         for i in range(n_tts)])
    _wav(out / "s2st" / "p_1.wav")
    _jsonl(out / "items" / "s2st.jsonl", [{"id": "p/1", "source_text": "bonjour", "reference": "hello",
                                           "translation": "hello", "transcribed_source": "bonjour",
                                           "asr_transcript": "hello", "ended": "max_seconds", "seconds": 0.5,
                                           "similarity": None}])
    _jsonl(out / "items" / "asr.jsonl", [{"id": "u1", "reference": "the cat sat", "hypothesis": "the cat sit",
                                          "ended": "text_end"}])
    _jsonl(out / "items" / "swuggy.jsonl", [{"id": f"w{i}", "group": None, "good": -1.0 - i, "bad": -2.0 + i,
                                             "correct": -1.0 - i > -2.0 + i} for i in range(4)])
    tasks = {
        "swuggy": {"metric": "accuracy", "value": 0.5, "count": 4, "skipped_count": 0,
                   "items_file": "items/swuggy.jsonl"},
        "nll": {"metric": "nll (nats/token, all tokens)", "value": 3.0, "count": 100, "skipped_count": 0,
                "nll_by_group": {"text": 2.0 * nll_scale, "semantic": 5.0 * nll_scale, "acoustic_1": 6.0 * nll_scale},
                "bits_per_audio_second": 400.0 * nll_scale},
        "tts": {"metric": "WER (ASR: pocketsphinx)", "value": 0.33, "count": n_tts, "skipped_count": 0,
                "items_file": "items/tts.jsonl", "settings": {"data": str(voices / "tts.jsonl")},
                "also": [{"metric": "speaker similarity (cosine)", "value": 0.4, "count": n_tts, "soda_key": "tts_sim",
                          "percent": False}]},
        "s2st": {"metric": "ASR-BLEU", "value": 100.0, "count": 1, "skipped_count": 0,
                 "items_file": "items/s2st.jsonl", "settings": {"data": str(root / "gone.tsv")}},
        "asr": {"metric": "WER (corpus, normalised)", "value": 0.33, "count": 1, "skipped_count": 0,
                "items_file": "items/asr.jsonl"},
        "mcq": {"metric": "accuracy (length-normalised log-likelihood)", "value": 0.5, "count": 4, "skipped_count": 0,
                "accuracy_raw": 0.25, "chance": 0.25,
                "by_domain": {"sound": {"accuracy": 0.5, "accuracy_raw": 0.5, "accuracy_silence": 0.25,
                                        "chance": 0.25, "count": 4}},
                "audio_contribution": {"condition": "the item's audio replaced by silence of the same length",
                                       "accuracy_silence": 0.25, "correct_without_audio": 1,
                                       "correct_only_with_audio": 1}},
    }
    header = {"model": {"source": "runs/tiny", "codec": "mimi", "parameters": 135_000_000,
                        "non_embedding_parameters": 100_000_000, "soda_size": "135M"},
              "checkpoint": {"path": "runs/tiny", "digest": "x"}, "tasks": tasks}
    (out / RESULTS).write_text(json.dumps(header))
    return out


def test_eval_page_has_table_beside_soda_nll_chart_players_and_sections(tmp_path):
    out = _eval_out(tmp_path)
    other = _eval_out(tmp_path, "other", nll_scale=1.2)
    page = write_eval_page(out, compare=other).read_text()
    assert "<script src" not in page and "<link" not in page  # self-contained
    assert "SODA-135M" in page and ">56.3<" in page and ">0.5<" in page  # sWUGGY and TTS SIM published numbers
    assert page.count("<rect") >= 6 and "eval" in page and "other" in page and "400 bits per audio-second" in page
    srcs = re.findall(r'<audio [^>]*src="([^"]+)"', page)
    assert "tts/t0.wav" in srcs and "s2st/p_1.wav" in srcs  # generated speech linked relative to OUT
    assert sum(s.startswith("data:audio/wav;base64,") for s in srcs) == 2  # the voice prompts, embedded
    assert page.count('src="data:image/png;base64,') == len(srcs)  # a spectrogram per player
    assert "source speech: not available" in page  # the S2ST manifest is gone: said, not a crash
    assert "hello number 1" in page and "audio_end" in page and "max_seconds" in page and "the cat sit" in page
    assert "with silence" in page and "sound" in page  # MCQ per domain with the silence control
    assert "Worst items" in page and "w3" in page  # swuggy's wrong pairs


def test_eval_page_limits_items_and_is_rebuilt_by_merge(tmp_path):
    from soda.evaluate.report import merge
    from soda.evaluate.tasks import available

    out = _eval_out(tmp_path, n_tts=ITEM_LIMIT + 3)
    page = write_eval_page(out).read_text()
    assert f"Showing the first {ITEM_LIMIT} of {ITEM_LIMIT + 3}" in page and "<b>t52</b>" not in page and "<b>t49</b>" in page
    header = json.loads((out / RESULTS).read_text())
    header.pop("tasks")
    merge(out, header, {"twuggy": {"metric": "accuracy", "value": 0.75, "count": 4, "skipped_count": 0,
                                   "_items": [{"id": "z", "good": -3.0, "bad": -1.0, "correct": False}]}}, available())
    page = (out / "report.html").read_text()
    assert "tWUGGY" in page and "TTS" in page and ">70.7<" in page


def test_soda_eval_writes_the_page_and_compare_must_be_an_eval_dir(tiny_run, tmp_path, capsys):
    from soda.evaluate.cli import main

    words = tmp_path / "words.jsonl"
    words.write_text("".join(json.dumps({"good": g, "bad": b}) + "\n" for g, b in
                             (("the cat sat", "cat the sat"), ("a dog ran", "dog a ran"))))
    out, other = tmp_path / "eval", _eval_out(tmp_path, "other")
    args = [str(tiny_run), "--tasks", "twuggy", "--data-for", f"twuggy={words}", "--out", str(out), "--quiet"]
    assert main(args + ["--compare", str(other)]) == 0
    assert "tWUGGY" in (out / "report.html").read_text()
    assert (tiny_run / "report.html").is_file()  # soda-train wrote its page at the end of the run
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--compare", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("soda-eval: error: --compare") and "results.json" in err


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    logs = run / "logs" / "version_0"
    logs.mkdir(parents=True)
    lines = ["step,train/loss,val/loss,val/nll_text,val/nll_semantic,val/nll_acoustic_1,val/bits_per_audio_second"]
    lines += [f"{s},{5 - s / 10},,,,," for s in range(1, 11)]
    lines += [f"{s},,{4 - s / 10},{3 - s / 10},{5 - s / 10},{6 - s / 10},{500 - s}" for s in (5, 10)]
    (logs / "metrics.csv").write_text("\n".join(lines) + "\n")
    for step in (5, 10):
        folder = run / "samples" / f"step_{step:07d}"
        _wav(folder / "tts_0.wav", freq=200 + step)
        (folder / "samples.json").write_text(json.dumps([
            {"name": "tts_0", "kind": "tts", "prompt": f"say {step}", "text": None, "wav": "tts_0.wav",
             "seconds": 0.5, "ended": "audio_end"},
            {"name": "asr_0", "kind": "asr", "prompt": "held-out utterance", "text": "the words heard",
             "wav": None, "seconds": None, "ended": "text_end"}]))
    return run


def test_run_page_has_curves_nll_vector_and_the_newest_samples(tmp_path):
    from soda.train.report import write_reports

    run = _run_dir(tmp_path)
    assert "report.html" in write_reports(run)
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3  # loss, NLL over steps, the sample's spectrogram
    assert "say 10" in page and "say 5" not in page and "the words heard" in page and "text_end" in page
    assert 'src="samples/step_0000010/tts_0.wav"' in page and "490 bits per audio-second" in page


# --- a real browser ------------------------------------------------------------------------------
def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)


def _open(browser: str, page: Path, tmp_path: Path) -> tuple[str, str, Path]:
    """(DOM after scripts ran, console log, screenshot) of a page opened from disk."""
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
            "--autoplay-policy=no-user-gesture-required", "--enable-logging=stderr", "--v=0",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run(base + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    shot = tmp_path / f"{page.parent.name}.png"
    subprocess.run(base + [f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()], capture_output=True,
                   text=True, timeout=120)
    return dom.stdout, dom.stderr, shot


def _console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH (scripts/install.sh --test installs Debian's)")
@pytest.mark.parametrize("which", ["eval", "run"])
def test_pages_render_in_headless_chromium_with_playable_audio(tmp_path, which):
    from PIL import Image

    if which == "eval":
        page = write_eval_page(_eval_out(tmp_path), compare=_eval_out(tmp_path, "other", nll_scale=1.2))
    else:
        from soda.train.report import write_reports

        run = _run_dir(tmp_path)
        write_reports(run)
        page = run / "report.html"
    dom, log, shot = _open(_chromium(), page, tmp_path)
    assert not _console_errors(log), _console_errors(log)
    audios = re.findall(r"<audio [^>]*>", dom)
    assert audios and len(audios) == page.read_text().count("<audio ")
    durations = [re.search(r'data-duration="([^"]+)"', a) for a in audios]
    assert all(d and float(d.group(1)) > 0 for d in durations), audios
    assert not any("data-error" in a for a in audios)
    image = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    assert len(image.getcolors(maxcolors=1 << 20) or [0, 0]) > 1  # not blank: more than one colour
