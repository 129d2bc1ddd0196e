"""The HTTP side of ``medsegx serve``: a Starlette app with the page at ``/`` and the JSON API under ``/api/``.

docs/SERVE.md describes every route. All work on images runs in worker threads (the event loop only
parses requests); :class:`~medsegx.serve.sessions.ImageSession` serialises requests on one image.
Every failure is JSON ``{"error": "..."}``: 400 for a bad argument (naming it), 403 for a path outside
``--root`` or a missing token, 404 for an unknown image, route or label, 413 for an upload over the
limit; a bug answers 500 with its one-line message and the server goes on.
"""
from __future__ import annotations

import hmac
import json
import logging
import shutil
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..data.presets import WINDOW_PRESETS
from ..data.taxonomy import load_taxonomy
from ..errors import UserError
from .cache import EmbeddingCache
from .sessions import ApiError, SessionStore, default_display

logger = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
TOKEN_HEADER = "X-MedSegX-Token"


class _TooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: the token on every ``/api/`` request (when set) and the upload size limit."""

    def __init__(self, app, token: str | None, max_upload_bytes: int) -> None:
        self.app, self.token, self.max_upload_bytes = app, token, max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.token is not None:
            given = headers.get(TOKEN_HEADER.lower(), "")
            if not given and headers.get("authorization", "").startswith("Bearer "):
                given = headers["authorization"][len("Bearer "):]
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return await _error(403, f"token: missing or wrong (send the {TOKEN_HEADER} header)")(
                    scope, receive, send)
        if scope["method"] == "POST" and scope["path"] == "/api/images":
            limit = self.max_upload_bytes
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                return await _error(413, f"upload: {int(length)} bytes is over the limit of {limit} bytes "
                                         "(--max_upload_mb)")(scope, receive, send)
            seen = 0

            async def counted():
                nonlocal seen
                message = await receive()
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(f"upload: over the limit of {limit} bytes (--max_upload_mb)")
                return message

            return await self.app(scope, counted, send)
        return await self.app(scope, receive, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(runner, store: SessionStore, cache: EmbeddingCache, model_info: dict, *, token: str | None = None,
               max_upload_bytes: int = 1 << 30) -> Guard:
    """The ASGI app over one ``runner`` (a SliceRunner over a :class:`~medsegx.serve.cache.CachedModel`)."""

    async def body_json(request: Request):
        raw = await request.body()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ApiError(400, f"body: not valid JSON ({err})") from None

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def health(request: Request):
        return JSONResponse({"status": "ok", **model_info, "images": len(store), "cache": cache.stats()})

    async def taxonomy(request: Request):
        tax = load_taxonomy()
        modalities = sorted({*tax.modalities, *(a for names in tax.spellings.values() for a in names)})
        tasks = sorted({*tax.tasks, *tax.targets})
        return JSONResponse({"modalities": modalities, "tasks": tasks,
                             "windows": {k: list(v) for k, v in WINDOW_PRESETS.items()}})

    async def files(request: Request):
        return JSONResponse({"root": str(store.root) if store.root else None,
                             "files": await run_in_threadpool(store.list_files)})

    async def open_image(request: Request):
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=1, max_fields=4)
            except _TooLarge as err:
                raise ApiError(413, str(err)) from None
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "file: a multipart upload needs a 'file' field holding the image")
            modality = form.get("modality")

            def save_to(path: Path) -> None:
                upload.file.seek(0)
                with open(path, "wb") as handle:
                    shutil.copyfileobj(upload.file, handle, 1 << 20)

            try:
                session = await run_in_threadpool(store.open_upload, upload.filename or "", save_to)
            finally:
                await upload.close()
        else:
            try:
                body = await body_json(request)
            except _TooLarge as err:
                raise ApiError(413, str(err)) from None
            if not isinstance(body, dict):
                raise ApiError(400, 'body: expected {"path": "<relative to --root>"} or a multipart upload')
            unknown = sorted(set(body) - {"path", "modality", "task"})
            if unknown:
                raise ApiError(400, f"unknown field(s) {unknown}; allowed: ['modality', 'path', 'task']")
            session = await run_in_threadpool(store.open_path, body.get("path"))
            modality = body.get("modality")
        if isinstance(modality, str) and modality:
            try:
                display = default_display(modality, None)
            except UserError as err:
                store.delete(session.id)
                raise ApiError(400, f"modality: {err}") from None
            if display is not None and not session.colour:
                session.display = display
        return JSONResponse(session.info(), status_code=201)

    def image_of(request: Request):
        return store.get(request.path_params["image_id"])

    async def image_info(request: Request):
        session = image_of(request)
        return JSONResponse(await run_in_threadpool(session.info))

    async def close_image(request: Request):
        image_id = request.path_params["image_id"]
        await run_in_threadpool(store.delete, image_id)
        return JSONResponse({"deleted": image_id})

    def _float_param(request: Request, name: str) -> float | None:
        value = request.query_params.get(name)
        if value is None or value == "":
            return None
        try:
            return float(value)
        except ValueError:
            raise ApiError(400, f"{name}: a number, got {value!r}") from None

    async def slice_png(request: Request):
        session = image_of(request)
        level, width = _float_param(request, "level"), _float_param(request, "width")
        data = await run_in_threadpool(session.slice_png, request.path_params["z"], level, width)
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-cache"})

    async def label_slice_png(request: Request):
        session = image_of(request)
        data = await run_in_threadpool(session.label_png, request.path_params["z"])
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})

    async def segment(request: Request):
        session = image_of(request)
        body = await body_json(request)
        result = await run_in_threadpool(session.segment, runner, body)
        logger.info("%s: label %d on %d slice(s) %s, %d voxels, %.2f s; %s", session.name, result["label"],
                    len(result["slices"]), _span(result["slices"]), result["voxels"], result["seconds"],
                    cache.describe())
        result["cache"] = cache.stats()
        return JSONResponse(result)

    async def objects(request: Request):
        session = image_of(request)
        return JSONResponse({"objects": await run_in_threadpool(session.object_table)})

    async def erase(request: Request):
        session = image_of(request)
        return JSONResponse(await run_in_threadpool(session.erase, request.path_params["label"]))

    async def undo(request: Request):
        session = image_of(request)
        return JSONResponse(await run_in_threadpool(session.undo))

    async def label_file(request: Request):
        session = image_of(request)
        ext = request.path_params["ext"]
        if ext not in ("nii.gz", "png"):
            raise ApiError(404, f"label.{ext}: the label map is label.nii.gz (volumes) or label.png (2-D images)")
        want_png = ext == "png"
        if want_png != session.is_2d:
            kind = "a 2-D image: label.png" if session.is_2d else "a volume: label.nii.gz"
            raise ApiError(404, f"image {session.id} is {kind}")
        data = await run_in_threadpool(_encoded, session, ".png" if want_png else ".nii.gz")
        media = "image/png" if want_png else "application/gzip"
        filename = f"{session.case}.{'png' if want_png else 'nii.gz'}"
        return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    async def save(request: Request):
        session = image_of(request)
        result = await run_in_threadpool(session.save, store.output_dir)
        return JSONResponse(result)

    async def api_error(request: Request, err: ApiError):
        if err.status >= 500:
            logger.error("%s %s: %s", request.method, request.url.path, err)
        return _error(err.status, str(err))

    async def user_error(request: Request, err: UserError):
        return _error(400, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)

    async def http_error(request: Request, err: HTTPException):
        if request.url.path.startswith("/api/") or err.status_code != 404:
            return _error(err.status_code, f"{request.method} {request.url.path}: {err.detail}")
        return _error(404, f"{request.url.path}: not found")

    async def server_error(request: Request, err: Exception):
        logger.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error: {type(err).__name__}: {err}")

    image = "/api/images/{image_id}"
    routes = [
        Route("/", index),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        Route("/api/health", health),
        Route("/api/taxonomy", taxonomy),
        Route("/api/files", files),
        Route("/api/images", open_image, methods=["POST"]),
        Route(image, image_info, methods=["GET"]),
        Route(image, close_image, methods=["DELETE"]),
        Route(image + "/slices/{z:int}.png", slice_png),
        Route(image + "/labels/{z:int}.png", label_slice_png),
        Route(image + "/segment", segment, methods=["POST"]),
        Route(image + "/objects", objects),
        Route(image + "/objects/{label:int}", erase, methods=["DELETE"]),
        Route(image + "/undo", undo, methods=["POST"]),
        Route(image + "/label.{ext:str}", label_file),
        Route(image + "/save", save, methods=["POST"]),
    ]
    handlers = {ApiError: api_error, UserError: user_error, HTTPException: http_error, Exception: server_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.store, app.state.cache = store, cache
    return Guard(app, token, max_upload_bytes)


def _encoded(session, suffix: str) -> bytes:
    """The label map in the image's geometry as file bytes (written to a temporary file by SimpleITK)."""
    import tempfile

    import SimpleITK as sitk

    with tempfile.TemporaryDirectory(prefix="medsegx-label-") as folder:
        path = Path(folder) / f"label{suffix}"
        sitk.WriteImage(session.label_image(), str(path), useCompression=True)
        return path.read_bytes()


def _span(slices: list[int]) -> str:
    if not slices:
        return "-"
    return str(slices[0]) if len(slices) == 1 else f"{slices[0]}-{slices[-1]}"
