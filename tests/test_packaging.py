"""The installed package layout matches the repository: envs/ is diffplan.envs, nothing global."""
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"diffplan." + ".".join(p.parent.relative_to(ROOT / "diffplan").parts) if p.parent != ROOT / "diffplan"
             else "diffplan" for p in (ROOT / "diffplan").rglob("__init__.py")}
    found |= {"diffplan.envs" + "".join("." + part for part in p.parent.relative_to(ROOT / "envs").parts)
              for p in (ROOT / "envs").rglob("__init__.py")}
    assert found == listed, f"pyproject packages differ from the tree: missing {found - listed}, stale {listed - found}"


def test_envs_installs_as_a_subpackage_of_diffplan():
    import diffplan.envs

    assert Path(diffplan.envs.__file__).resolve().parent == ROOT / "envs"
