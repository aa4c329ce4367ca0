"""The committed demo corpus is what demo/make_demo_corpus.py makes (speech synthesis is deterministic)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import DEMO, REPO

TOOLS = ("espeak-ng", "flite", "sox", "bible")


@pytest.mark.slow
@pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                    reason=f"needs {', '.join(TOOLS)} (scripts/install.sh installs them)")
def test_script_reproduces_the_bundled_corpus(tmp_path):
    out = tmp_path / "corpus"
    proc = subprocess.run([sys.executable, str(REPO / "demo" / "make_demo_corpus.py"), "--out", str(out),
                           "--seed", "0", "--jobs", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    made = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    bundled = sorted(p.relative_to(DEMO).as_posix() for p in DEMO.rglob("*") if p.is_file())
    assert made == bundled
    assert sum(1 for p in made if p.endswith(".flac")) == 255
    # Transcripts and the text share are identical; audio matches in length.
    for rel in made:
        if rel.endswith(".txt"):
            assert (out / rel).read_bytes() == (DEMO / rel).read_bytes(), rel
    import soundfile as sf

    for rel in [p for p in made if p.endswith(".flac")][::25]:
        assert sf.info(str(out / rel)).frames == sf.info(str(DEMO / rel)).frames, rel
