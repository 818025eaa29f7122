"""The installed package layout matches the repository: envs/ is diffplan.envs, nothing global;
configs/ and part of checkpoints/ are package data that diffplan.resources finds."""
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
DATA_PACKAGES = {"diffplan.configs", "diffplan.checkpoints"}  # folders of package data, no modules


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"diffplan." + ".".join(p.parent.relative_to(ROOT / "diffplan").parts) if p.parent != ROOT / "diffplan"
             else "diffplan" for p in (ROOT / "diffplan").rglob("__init__.py")}
    found |= {"diffplan.envs" + "".join("." + part for part in p.parent.relative_to(ROOT / "envs").parts)
              for p in (ROOT / "envs").rglob("__init__.py")}
    assert found | DATA_PACKAGES == listed, f"pyproject packages differ from the tree: missing {found - listed}, stale {listed - found}"


def test_envs_installs_as_a_subpackage_of_diffplan():
    import diffplan.envs

    assert Path(diffplan.envs.__file__).resolve().parent == ROOT / "envs"


def test_shipped_files_resolve_from_the_checkout_and_user_paths_win(tmp_path, monkeypatch):
    from diffplan.resources import find, shipped

    monkeypatch.chdir(tmp_path)
    assert find("configs/diffuser/pointmaze-umaze.yaml") == ROOT / "configs/diffuser/pointmaze-umaze.yaml"
    assert shipped("checkpoints/behavior") == ROOT / "checkpoints/behavior"
    assert find("no/such/thing") == Path("no/such/thing") and shipped("no/such/thing") is None
    (tmp_path / "configs/diffuser").mkdir(parents=True)
    (tmp_path / "configs/diffuser/pointmaze-umaze.yaml").write_text("kind: diffuser\n")
    assert find("configs/diffuser/pointmaze-umaze.yaml") == Path("configs/diffuser/pointmaze-umaze.yaml")


def test_package_data_holds_every_config_the_demo_checkpoint_and_the_behavior_snapshots():
    import glob

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {str(Path(p).relative_to(ROOT)) for pattern in data["diffplan.configs"]
               for p in glob.glob(str(ROOT / "configs" / pattern))}
    assert shipped == {str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")}
    files = {Path(p) for pattern in data["diffplan.checkpoints"] for p in glob.glob(str(ROOT / "checkpoints" / pattern))}
    assert ROOT / "checkpoints/pointmaze-umaze/diffuser/model.safetensors" in files
    assert set((ROOT / "checkpoints/behavior").rglob("actor.*")) <= files
    assert not any("behavior-v1" in str(p) for p in files)  # 26 MB of v1 snapshots stay in the repository
    assert sum(p.stat().st_size for p in files) < 16e6  # the wheel stays small (README: what goes in)
