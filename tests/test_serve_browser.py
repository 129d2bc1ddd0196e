"""``medsegx serve`` end to end in a real browser: Playwright drives Debian's Chromium against uvicorn on a
free loopback port; the page opens the shared CT, a box is drawn with the mouse, the overlay appears, and
the saved label file holds that box, in the CT's geometry.

Skips with the reason where Playwright or Chromium is missing (``apt-get install -y chromium``).
"""
from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared_path

pytest.importorskip("starlette", reason="the 'serve' extra is not installed (pip install '.[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="the 'serve' extra is not installed (pip install '.[serve]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (the 'dev' extra)")

from test_serve import CT, BoxIsTheMask  # noqa: E402

from medsegx.inference.runner import SliceRunner  # noqa: E402
from medsegx.serve.app import create_app  # noqa: E402
from medsegx.serve.cache import CachedModel, EmbeddingCache  # noqa: E402
from medsegx.serve.sessions import SessionStore  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ct.nii.gz").write_bytes(shared_path(*CT).read_bytes())
    cache = EmbeddingCache(16 << 20)
    store = SessionStore(root, tmp_path / "labels", upload_dir=tmp_path)
    app = create_app(SliceRunner(CachedModel(BoxIsTheMask(), cache), "cpu"), store, cache,
                     {"model_type": "stand-in", "device": "cpu"})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", root, tmp_path / "labels"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        store.close_all()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install -y chromium)")
def test_open_draw_overlay_save_in_chromium(server):
    url, root, labels = server
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready='1']", timeout=30000)
            page.fill("#path", "ct.nii.gz")
            page.click("#open-form button")
            page.wait_for_selector("body[data-image]", timeout=30000)
            assert page.evaluate("state.z") == 15  # opens on the middle slice
            page.mouse.move(*page.evaluate("[innerWidth / 2 + 150, innerHeight / 2]"))
            page.mouse.wheel(0, 100)
            page.keyboard.press("ArrowUp")
            page.wait_for_function("state.z === 17 && document.getElementById('slice-label').textContent === '18 / 30'")

            box = (30, 40, 70, 75)  # stored voxel indices x0 y0 x1 y1 of the box to draw
            corner = """([x, y]) => {  // a stored voxel -> the centre of its screen pixel, by the page's view
                const r = document.getElementById('canvas').getBoundingClientRect();
                const v = state.image.view, g = geometry(), [ox, oy] = origin(), [ku, kv] = scale();
                let u = v.transpose ? y : x, w = v.transpose ? x : y;
                if (v.flip_x) u = g.W - 1 - u;
                if (v.flip_y) w = g.H - 1 - w;
                return [r.left + ox + (u + 0.5) * ku, r.top + oy + (w + 0.5) * kv]; }"""
            page.fill("#label", "6")
            page.fill("#task", "Liver")
            page.mouse.move(*page.evaluate(corner, [box[0], box[1]]))
            page.mouse.down()
            page.mouse.move(*page.evaluate(corner, [box[2], box[3]]), steps=6)
            page.mouse.up()
            page.wait_for_function("Number(document.body.dataset.overlayPixels || 0) > 0", timeout=30000)
            assert page.inner_text("#objects tbody").split()[:2] == ["6", "Liver"]
            page.click("#save")
            page.wait_for_selector("body[data-saved]", timeout=30000)
            assert "saved" in page.inner_text("#status")
        finally:
            browser.close()
    assert not errors, errors
    saved = sitk.ReadImage(str(labels / "ct.nii.gz"))
    ct = sitk.ReadImage(str(root / "ct.nii.gz"))
    assert saved.GetSize() == ct.GetSize() and saved.GetSpacing() == ct.GetSpacing()
    assert saved.GetOrigin() == ct.GetOrigin() and saved.GetDirection() == ct.GetDirection()
    mask = sitk.GetArrayFromImage(saved) == 6
    assert mask[17].any() and not mask[np.arange(30) != 17].any()  # the slice the box was drawn on
    want = np.zeros_like(mask[17])
    want[box[1]:box[3] + 1, box[0]:box[2] + 1] = True
    assert (mask[17] & want).sum() / (mask[17] | want).sum() > 0.9  # the box drawn, in stored voxels
