"""Optional dependencies: import them with an error that names the extra to install."""

from __future__ import annotations

import importlib

# module -> the extra of pyproject.toml that provides it
EXTRAS = {
    "numba": "compress",
    "safetensors": "compress",
    "transformers": "hf",
    "triton": "triton",
    "matplotlib": "plot",
    "fastapi": "serve",
    "uvicorn": "serve",
    "peft": "bench",
    "torchao": "bench",
}


def require(module: str, feature: str):
    """Import ``module`` or raise ``ImportError`` naming ``pip install "moeflow[extra]"``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS.get(module.split(".")[0])
        hint = f'pip install "moeflow[{extra}]"' if extra else f"pip install {module}"
        raise ImportError(f"{feature} needs {module}, which is not installed: run {hint}") from e
