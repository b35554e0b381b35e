"""Which pip extra of curate provides which optional package, and the error that says how to install it.

The core install (`pip install curate`) is the library: torch, torchdata, numpy, polars, fsspec. The jobs in
`pipelines/` and the `curate` command need the `app` extra; tiny CLIP models need `clip`. A feature whose
package is missing fails with the pip command that installs it, not with a bare `No module named ...`.

Stdlib only: the CLI checks the app extra with it before it imports torch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["APP_MODULES", "EXTRAS", "MissingExtraError", "explain", "missing_message", "missing_modules",
           "needs_extra"]

# import name → (the extra that installs it, its name on PyPI)
EXTRAS: dict[str, tuple[str, str]] = {
    "pydantic": ("app", "pydantic"),
    "yaml": ("app", "pyyaml"),
    "tqdm": ("app", "tqdm"),
    "matplotlib": ("app", "matplotlib"),
    "safetensors": ("app", "safetensors"),
    "webdataset": ("app", "webdataset"),
    "sklearn": ("app", "scikit-learn"),
    "PIL": ("app", "pillow"),
    "torchvision": ("vision", "torchvision"),
    "open_clip": ("clip", "open_clip_torch"),
    "faiss": ("curation", "faiss-cpu"),
    "s3fs": ("s3", "s3fs"),
    "ray": ("ray", "ray[data]"),
}

# What every `curate` command may need: the app extra, which includes clip (the default task tokenizes captions
# and builds tiny CLIP models with open_clip).
APP_MODULES = ("pydantic", "yaml", "tqdm", "matplotlib", "safetensors", "webdataset", "sklearn", "open_clip")


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names the pip command that installs it."""


def _message(feature: str, modules: list[str]) -> str:
    extras = sorted({EXTRAS[name][0] for name in modules})
    if "app" in extras and "clip" in extras:  # the app extra installs clip too
        extras.remove("clip")
    packages = ", ".join(EXTRAS[name][1] for name in modules)
    verb = "is" if len(modules) == 1 else "are"
    return f'{feature} needs {packages}, which {verb} not installed: pip install "curate[{",".join(extras)}]"'


def explain(error: ModuleNotFoundError, feature: str) -> MissingExtraError | None:
    """The install hint for `error` when the missing module belongs to an extra, else None."""
    root = (error.name or "").partition(".")[0]
    if root not in EXTRAS:
        return None
    return MissingExtraError(_message(feature, [root]))


@contextmanager
def needs_extra(feature: str) -> Iterator[None]:
    """Imports in this block that fail because an extra is not installed raise a MissingExtraError saying
    `feature needs <package>, which is not installed: pip install "curate[<extra>]"`. A module missing for
    another reason (e.g. a broken install of one of the package's own dependencies) propagates unchanged."""
    try:
        yield
    except ModuleNotFoundError as error:
        hint = explain(error, feature)
        if hint is None:
            raise
        raise hint from error


def missing_modules(modules: tuple[str, ...] = APP_MODULES) -> list[str]:
    """Those of `modules` that cannot be imported, found without importing them (`find_spec` reads no module)."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:  # an import hook refusing it reads the same as not installed
            found = False
        if not found:
            missing.append(name)
    return missing


def missing_message(feature: str, modules: tuple[str, ...] = APP_MODULES) -> str | None:
    """`feature needs ...: pip install "curate[...]"` for the missing ones of `modules`, or None if all are there."""
    missing = missing_modules(modules)
    return _message(feature, missing) if missing else None
