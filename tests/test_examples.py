"""docs/examples run as a user runs them: offline (any HTTP request would fail), and they learn."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import private_cache

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": ""}


def run_example(name: str, tmp_path: Path) -> str:
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT), "CBAM_JAX_CACHE": str(private_cache(tmp_path / "cache"))}
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "examples" / name)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    return done.stdout


@pytest.mark.slow
def test_segmentation_head_example(tmp_path):
    out = run_example("segmentation_head.py", tmp_path)
    assert "layer1: 16 ch, stride 4, layer2: 32 ch, stride 8, layer3: 64 ch, stride 16" in out  # width 16
    before, after = map(float, re.search(r"mean IoU on held-out images: ([\d.]+) before, ([\d.]+) after", out).groups())
    assert after > before + 0.2 and after > 0.5


@pytest.mark.slow
def test_finetune_from_plain_example(tmp_path):
    out = run_example("finetune_from_plain.py", tmp_path)
    assert re.search(r"cbam_resnet18 from the plain resnet18: 100 tensors loaded, 74 new \(attention 72, head 2\), "
                     r"2 dropped \(head 2\)", out)
    before, after = map(float, re.search(r"accuracy ([\d.]+) -> ([\d.]+); stem .* unchanged: True", out).groups())
    assert after > max(0.8, before + 0.3)
