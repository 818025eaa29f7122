"""A built wheel works without the repository: installed into a fresh venv (non-editable) and run
from another folder, `diffplan demo` finds its checkpoint and the locomotion recipes find their
behavior snapshots in the package data. About 2-3 minutes here (pip's cache; torch from a local
CPU wheel); a CI without them downloads the dependencies once, torch from PIP_INDEX_URL if set."""
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(command, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], check=False, capture_output=True, text=True, timeout=1200, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_the_wheel_runs_its_demo_and_makes_locomotion_data_outside_the_repository(tmp_path):
    start = time.perf_counter()
    source, dist = tmp_path / "source", tmp_path / "dist"  # built from a copy: no build/ left here
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".*venv*", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, source])
    (wheel,) = dist.glob("diffplan-*.whl")
    assert wheel.stat().st_size < 16e6  # README: about 12 MB
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"diffplan/checkpoints/pointmaze-umaze/diffuser/model.safetensors",
            "diffplan/checkpoints/behavior/hopper/step-110000/actor.safetensors",
            "diffplan/configs/diffuser/pointmaze-umaze.yaml", "diffplan/envs/locomotion.py"} <= names
    assert not any(n.startswith("diffplan/checkpoints/hopper-medium/") for n in names)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    run([python, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"])
    run([python, "-m", "pip", "install", "-q", wheel])
    installed = time.perf_counter()

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MUJOCO_GL")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", MINARI_DATASETS_PATH=str(tmp_path / "minari"),
               MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    demo = run([bin_dir / "diffplan", "demo", "--episodes", "2"], cwd=work, env=env)
    assert "score" in demo.stdout and (work / "diffplan-demo" / "report.json").is_file()

    make = ("from diffplan.resources import shipped\n"
            "from diffplan.envs import get_task\n"
            "behavior = shipped('checkpoints/behavior')\n"
            "assert 'site-packages' in str(behavior), behavior\n"
            "for name in ('hopper-medium-replay', 'walker2d-medium-expert'):\n"
            "    data = get_task(name).make_dataset(progress=False, steps=2000)\n"
            "    print(name, len(data))\n")
    made = run([python, "-c", make], cwd=work, env=env)
    assert "hopper-medium-replay 2000" in made.stdout and "walker2d-medium-expert 2000" in made.stdout
    print(f"wheel test: build + install {installed - start:.0f} s, "
          f"total {time.perf_counter() - start:.0f} s")
