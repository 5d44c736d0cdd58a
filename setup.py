"""Build script.

Metadata lives in pyproject.toml. This file declares the packages (``backends/`` in the
source tree installs as ``lightning_backends``) and, later, builds ``lightning/_ext``.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["lightning", "lightning.*"])
packages += ["lightning_backends"] + [
    "lightning_backends." + p for p in find_packages(where="backends")
]

setup(packages=packages)
