"""Packaging: the rooms stay top-level folders, installed under one import name, `loramux`.

`kernels`, `scheduler` and `clients` are other distributions' names on PyPI, so each room
is installed as `loramux.<room>` (e.g. `from loramux.kernels.metadata import LoraBatchInfo`).
The kernels room's folder is `loramux_kernels/`, not `kernels/`: tests and benches run with
the repository root on sys.path, where a `kernels/` folder would shadow the PyPI package
`kernels` that transformers (>= 5.25) imports.
Everything else about the project lives in pyproject.toml.
"""

from setuptools import find_packages, setup

ROOMS = ["server", "scheduler", "adapter_store", "loramux_kernels", "clients"]
IMPORT_NAMES = {"loramux_kernels": "kernels"}  # folder -> name under loramux, where they differ

package_dir = {f"loramux.{IMPORT_NAMES.get(room, room)}": room for room in ROOMS}
packages = [
    name
    for room in ROOMS
    for package in [f"loramux.{IMPORT_NAMES.get(room, room)}"]
    for name in [package, *(f"{package}.{sub}" for sub in find_packages(room))]
]
# The Ray Serve app (deploy/ray) ships as loramux.ray_serve; it imports ray only when used
# (the extra `loramux[ray]` installs it).
package_dir["loramux.ray_serve"] = "deploy/ray"
packages.append("loramux.ray_serve")

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"loramux.kernels": ["cpu/*.c", "cpu/*.h"]},
)
