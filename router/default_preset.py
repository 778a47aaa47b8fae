"""The preset a bare `modelyard` serves: presets/default.ini, installed inside the package.

pyproject.toml maps the presets folder to the package `router.default_presets`, so a wheel
(`pip install .`) carries it. From a source checkout (an editable install, tests run from the
repository) `router` is imported from the tree, where the file sits in presets/ beside it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_PRESET_FILE = "default.ini"


def default_preset_path() -> Path:
    spec = importlib.util.find_spec("router.default_presets")
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_PRESET_FILE
        if installed.is_file():
            return installed
    return Path(__file__).resolve().parent.parent / "presets" / DEFAULT_PRESET_FILE
