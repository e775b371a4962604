"""The repository's top-level packages never shadow an installed distribution's module.

Tests and benches run with the repository root first on sys.path (`python -m pytest`,
`python -m bench.<name>`), so a top-level folder named like a dependency's import name
(`kernels`, which transformers >= 5.25 imports) is imported in its place, and transformers
fails at import. The rooms are installed as `loramux.<room>` (setup.py); their folders need
names no dependency uses.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def top_level_packages() -> list[str]:
    return sorted(p.name for p in REPO.iterdir() if (p / "__init__.py").is_file())


def test_no_top_level_package_shadows_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()  # top-level module -> distributions
    ours = {"loramux"}
    clashes = {name: installed[name] for name in top_level_packages() if set(installed.get(name, ())) - ours}
    assert not clashes, f"repository folders shadow installed modules: {clashes}"


def test_the_kernels_room_is_not_a_top_level_kernels_package():
    # transformers >= 5.25 depends on the PyPI package `kernels` whether it is installed here or not
    assert "kernels" not in top_level_packages()
    import loramux.kernels

    assert Path(loramux.kernels.__file__).parent == REPO / "loramux_kernels"
