"""Drop-in glue for the training loops people use. Each module needs its loop's library, installed by an extra:

- `curate.integrations.open_clip`: open_clip_train's `DataInfo` (`pip install "curate[open_clip]"`).
- `curate.integrations.lightning`: a `LightningDataModule` keeping every rank's state (`curate[lightning]`).
- `curate.integrations.hf`: Hugging Face `Trainer` glue and scorers for HF models (`curate[hf]`).
- `curate.integrations.accelerate`: per-rank pipeline state in `accelerator.save_state` (`curate[hf]`).

`import curate` never imports them: the core install stays torch + torchdata.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, package: str, feature: str) -> ModuleType:
    """`import module`, or an ImportError naming the pip command that installs it (not a bare "No module named")."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or not module.startswith(error.name):  # something the package itself imports is missing
            raise
        raise ImportError(f'{feature} needs {package}, which is not installed: pip install "curate[{extra}]"') from None
