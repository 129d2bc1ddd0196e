"""``medsegx serve``: a viewer in the browser and a JSON HTTP API over the project's one predictor.

- :mod:`.cache`: the model with a bounded LRU cache of image embeddings, kept across requests;
- :mod:`.sessions`: open images, their label maps, segment / erase / undo / save, safe paths;
- :mod:`.app`: the Starlette app (routes, errors, token, upload limit); ``static/``: the page.

The web stack is the optional extra ``serve`` (``pip install 'medsegx[serve]'``); :func:`require_extra`
says so in one line where it is missing. docs/SERVE.md documents the API.
"""
from __future__ import annotations

import importlib.util

from ..errors import UserError

EXTRA_MODULES = ("starlette", "uvicorn", "multipart", "PIL")


def require_extra() -> None:
    """A :class:`UserError` naming what to install when the ``serve`` extra is missing."""
    missing = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        names = {"multipart": "python-multipart", "PIL": "pillow"}
        raise UserError(f"medsegx serve needs the 'serve' extra ({', '.join(names.get(m, m) for m in missing)} "
                        "missing): pip install 'medsegx[serve]'")
