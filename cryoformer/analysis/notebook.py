"""The "your data" notebook, filled in for one run.

``cryoformer analyze RUN`` writes ``your_data.ipynb`` into its analysis folder: the template
shipped with the package (``cryoformer/notebooks/your_data.ipynb``, also the repository's
``notebooks/05_your_data.ipynb``) with its parameter cell set to that run and epoch, and the
example outputs the template carries removed, so nothing in the copy describes another run.
The notebook is plain JSON (nbformat 4); no Jupyter package is needed to write it.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Optional

from cryoformer.errors import PathLike

__all__ = ["TEMPLATE_NAME", "template_text", "prefilled_notebook", "write_prefilled_notebook"]

TEMPLATE_NAME = "your_data.ipynb"


def template_text() -> str:
    """The template notebook shipped with the package, as JSON text."""
    return (resources.files("cryoformer") / "notebooks" / TEMPLATE_NAME).read_text(encoding="utf-8")


def _parameter_lines(run_dir: str, epoch: Optional[object], k: int) -> list[str]:
    epoch_text = "None" if epoch is None else repr(epoch)
    lines = [
        f"RUN = {os.path.abspath(run_dir)!r}  # the run analysed",
        f"EPOCH = {epoch_text}  # the epoch analysed (its analysis folder holds this notebook)",
        "METADATA = None  # a .star/.cs with per-particle metadata to colour by (None: the run's input, if it is one)",
        f"K = {int(k)}  # K-means clusters (analyze's labels for this epoch are reused)",
        'OUT = "notebook_out"  # this notebook\'s outputs, next to it; a new folder per pass',
    ]
    return [line + "\n" for line in lines[:-1]] + [lines[-1]]


def prefilled_notebook(run_dir: PathLike, epoch: Optional[object], k: int) -> dict:
    """The template with its ``parameters`` cell set to ``run_dir``/``epoch``/``k`` and every
    output cleared.

    Raises
    ------
    ValueError
        The template has no cell tagged ``parameters`` (a packaging error).
    """
    nb = json.loads(template_text())
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"the notebook template must have one cell tagged 'parameters', found {len(tagged)}")
    tagged[0]["source"] = _parameter_lines(os.fspath(run_dir), epoch, k)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    return nb


def write_prefilled_notebook(path: PathLike, run_dir: PathLike, epoch: Optional[object], k: int) -> str:
    """Write :func:`prefilled_notebook` to ``path`` (inside a staged folder: no atomic rename
    needed here). Returns the path."""
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(prefilled_notebook(run_dir, epoch, k), fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    return path
