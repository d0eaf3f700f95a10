"""Where the shipped models and data live.

The project keeps ``models/`` and ``data/`` at the top of the repository. ``FUSEBUS_HOME``
points elsewhere (a container image, an unpacked release); otherwise the checkout that
holds this package is used.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The folder holding ``models/`` and ``data/``."""
    override = os.environ.get("FUSEBUS_HOME")
    return Path(override) if override else Path(__file__).resolve().parent.parent


def models_dir() -> Path:
    """The folder of shipped models (``.tflite``, ``.keras`` and their ``.json`` cards)."""
    return home() / "models"


def data_dir() -> Path:
    """The folder of shipped datasets."""
    return home() / "data"
