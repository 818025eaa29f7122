"""The README's "Train on your own dataset" and "Evaluate on your own environment" snippets run as
written: every fenced block after a `<!-- tested -->` line, in README order, in one fresh folder."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^<!-- tested -->\n```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_blocks() -> list[tuple[str, str]]:
    return BLOCK.findall((ROOT / "README.md").read_text())


def test_the_readme_marks_its_own_dataset_and_own_env_snippets():
    text = (ROOT / "README.md").read_text()
    for section in ("## Train on your own dataset", "## Evaluate on your own environment"):
        body = text.split(section, 1)[1].split("\n## ", 1)[0]
        assert "<!-- tested -->" in body, section
    assert {lang for lang, _ in readme_blocks()} == {"python", "bash"}


@pytest.mark.slow
def test_readme_snippets_run(tmp_path):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path / "minari"), "MPLBACKEND": "Agg",
           "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for i, (lang, code) in enumerate(readme_blocks()):
        command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
        done = subprocess.run(command, cwd=tmp_path, env=env, check=False, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"README block {i} ({lang}) failed:\n{code}\n{done.stderr[-3000:]}"
    for report in ("pendulum", "pendulum-scored", "pendulum-py"):
        assert (tmp_path / "runs/eval" / report / "report.json").is_file()
    assert (tmp_path / "runs/pendulum-py/checkpoints").is_dir()
