"""Packaging: the rooms stay top-level folders, installed under one import name, `loramux`.

`kernels`, `scheduler` and `clients` are other distributions' names on PyPI, so each room
is installed as `loramux.<room>` (e.g. `from loramux.kernels.metadata import LoraBatchInfo`).
Everything else about the project lives in pyproject.toml.
"""

from setuptools import find_packages, setup

ROOMS = ["server", "scheduler", "adapter_store", "kernels", "clients"]

package_dir = {f"loramux.{room}": room for room in ROOMS}
packages = [
    name
    for room in ROOMS
    for name in [f"loramux.{room}", *(f"loramux.{room}.{sub}" for sub in find_packages(room))]
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
