"""``medsegx serve``: the checks before any work, the model, then the web server (medsegx/serve/).

The model is built as ``predict.py`` builds it (:func:`~medsegx.recipes.common.model_from_args`) and
runs through the same :class:`~medsegx.inference.runner.SliceRunner`, wrapped in the server's
embedding cache (:class:`~medsegx.serve.cache.CachedModel`).
"""
from __future__ import annotations

import argparse
import logging
import socket
from pathlib import Path

from .. import runtime
from ..errors import UserError
from ..fileio import ensure_writable_dir

logger = logging.getLogger(__name__)


class ServeError(UserError, ValueError):
    """A problem with the command's arguments, found before the model is built."""


def check_folders(root: str | None, output_dir: str) -> tuple[Path | None, Path]:
    """``--root`` is a folder; ``--output_dir`` is writable and outside it (labels never go into the data)."""
    root_path = None
    if root is not None:
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise ServeError(f"--root {root}: no such folder")
        root_path = root_path.resolve()
    out = Path(output_dir).expanduser()
    resolved = out.resolve()
    if root_path is not None and (resolved == root_path or root_path in resolved.parents):
        raise ServeError(f"--output_dir {output_dir}: inside --root {root_path}; labels are never written into "
                         "the data folder (give an --output_dir outside it)")
    return root_path, ensure_writable_dir(out, "--output_dir")


def run(args: argparse.Namespace) -> None:
    from ..serve import require_extra

    require_extra()
    root, output_dir = check_folders(args.root, args.output_dir)
    sock = listen(args.host, args.port)  # a taken port fails before the model is built
    try:
        serve(args, sock, root, output_dir)
    finally:
        sock.close()


def serve(args: argparse.Namespace, sock: socket.socket, root: Path | None, output_dir: Path) -> None:
    """Build the model, the cache and the app, then serve on ``sock`` until interrupted."""
    import uvicorn

    from ..inference.runner import SliceRunner
    from ..serve.app import TOKEN_HEADER, create_app
    from ..serve.cache import CachedModel, EmbeddingCache
    from ..serve.sessions import SessionStore
    from .common import model_from_args

    info = runtime.setup(args, None)
    if args.compile:
        logger.warning("--compile is not used by the server (varying batches recompile)")
    model = model_from_args(args, info.device, args.model_weight, for_training=False)
    if args.model_weight is None:
        logger.warning("no --model_weight: the %s backbone alone (ConMoAE adapters at zero)", args.model_type)
    cache = EmbeddingCache(int(args.cache_mb * 2**20))
    runner = SliceRunner(CachedModel(model, cache), info.device, batch_size=args.batch_size, amp=args.use_amp,
                         amp_dtype=args.amp_dtype, select=args.select)
    store = SessionStore(root, output_dir, args.max_images)
    model_info = {"model_type": args.model_type, "model_weight": args.model_weight, "device": str(info.device),
                  "select": runner.select}
    app = create_app(runner, store, cache, model_info, token=args.token,
                     max_upload_bytes=int(args.max_upload_mb * 2**20))
    logger.info("images from %s, labels to %s; %s", root or "uploads only", output_dir, cache.describe())
    host = f"[{args.host}]" if ":" in args.host else args.host
    logger.info("open http://%s:%d/%s", host, sock.getsockname()[1], f"#token={args.token}" if args.token else "")
    if args.token:
        logger.info("API clients send the header %s: <token>", TOKEN_HEADER)
    try:
        uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False)).run(sockets=[sock])
    finally:
        store.close_all()


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one); a taken port is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as err:
        raise ServeError(f"--host {host} --port {port}: cannot listen ({err.strerror or err})") from None
