"""Where the packages live: the top-level folders map to ``specprof.*``.

The metadata is in pyproject.toml. Only the roots are listed here; their subpackages are
found (``find_packages``), so a new subpackage needs no edit.
"""

from setuptools import find_packages, setup

ROOTS = {
    "specprof": "src/specprof",
    "specprof.engine": "engine",
    "specprof.plugins": "plugins",
    "specprof.migrations": "migrations",
    "specprof.schemas": "schemas",
}

packages = []
package_dir = {}
for name, folder in ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
