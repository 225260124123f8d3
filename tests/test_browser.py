"""The pack as an artist sees it: ComfyUI's real frontend in headless Chromium (Debian's, driven by Playwright).

Every example workflow loads without missing nodes or widget drift; our extension loads without console
errors; the identity chip appears after a run queued with the UI's own Run button; screenshots are written
to out/screenshots/.
"""
import json
import os

import pytest

import harness
from helpers import EXAMPLES
import helpers
from helpers import HANG_CAP_S, wait_until
from helpers import http_get as _get

pytestmark = pytest.mark.browser
CHROMIUM = os.environ.get("IDP_CHROMIUM", "/usr/bin/chromium")
SHOTS = os.path.join(harness.REPO, "out", "screenshots")
CAP_MS = HANG_CAP_S * 1000   # Playwright waits in ms; the cap only guards against a hang

if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (CI installs Debian's chromium; set IDP_CHROMIUM)", allow_module_level=True)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright
    os.makedirs(SHOTS, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        pg = browser.new_page(viewport={"width": 1600, "height": 1000})
        pg.idp_errors = []
        pg.on("console", lambda m: pg.idp_errors.append(f"console: {m.text} @ {m.location}") if m.type == "error" else None)
        pg.on("pageerror", lambda e: pg.idp_errors.append(f"pageerror: {e} {getattr(e, 'stack', '')}"))
        # A fresh user dir gets a modal Templates dialog on first load (frontend 1.49: not a PrimeVue dialog; it
        # swallows clicks) and a missing-models dialog over the canvas: settle both before the page loads.
        _post_settings(server["url"], {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False})
        pg.goto(server["url"], wait_until="networkidle", timeout=CAP_MS)
        pg.wait_for_function("window.app && window.app.graph && window.__IDPORTRAIT_LOADED__", timeout=CAP_MS)
        clear_overlays(pg)
        yield pg
        browser.close()


def _post_settings(url, settings):
    import urllib.request
    req = urllib.request.Request(url + "/settings", data=json.dumps(settings).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200


def stand_in_ui(base):
    """A UI workflow on stand-in models, with a tiny Omni-ID file in the server's own models/omni_id."""
    import nodes
    from idportrait.omni_encoder import weights as W
    from workflow_tools import build_ui
    src = os.path.join(helpers.MODELS, helpers.write_weights("sd15", "browser_sd15.safetensors"))
    os.makedirs(os.path.join(base, "models", "omni_id"), exist_ok=True)
    meta, enc, proj = W.load_identity_weights(src)
    W.save_identity_weights(os.path.join(base, "models", "omni_id", "browser_sd15.safetensors"), enc, proj, meta)
    g = {
        "ckpt": {"type": "IDP_TinyModels", "inputs": {"family": "sd15", "weights_seed": 0}},
        "cv": {"type": "IDP_TinyClipVision", "inputs": {"weights_seed": 0}},
        "omni": {"type": "IDP_OmniIDLoader", "inputs": {"omni_id_file": "browser_sd15.safetensors"}},
        "faces": {"type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0x886644}},
        "enc": {"type": "IDP_OmniIDEncode", "inputs": {"omni_id_model": ("omni", 0), "clip_vision": ("cv", 0),
                                                       "faces": ("faces", 0), "crop": "center"}},
        "apply": {"type": "IDP_OmniIDApply", "inputs": {"model": ("ckpt", 0), "omni_id_model": ("omni", 0),
                                                        "identity": ("enc", 0), "weight": 1.0, "start_at": 0.0,
                                                        "end_at": 1.0, "apply_to": "cond"}},
        "pos": {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "portrait photo"}},
        "neg": {"type": "CLIPTextEncode", "inputs": {"clip": ("ckpt", 1), "text": "blurry"}},
        "latent": {"type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "sampler": {"type": "KSampler", "inputs": {"model": ("apply", 0), "positive": ("pos", 0), "negative": ("neg", 0),
                                                   "latent_image": ("latent", 0), "seed": 1, "steps": 2, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"type": "VAEDecode", "inputs": {"samples": ("sampler", 0), "vae": ("ckpt", 2)}},
        "save": {"type": "SaveImage", "inputs": {"images": ("decode", 0), "filename_prefix": "browser"}},
    }
    return build_ui(g, lambda t: nodes.NODE_CLASS_MAPPINGS.get(t), lambda t: nodes.NODE_CLASS_MAPPINGS[t].INPUT_TYPES())


def clear_overlays(page):
    """Close dialogs (templates, missing models) and notices that cover the canvas or the Run button."""
    for _ in range(6):
        if not page.locator(".p-dialog-mask").count():
            break
        open_dialogs = page.locator(".p-dialog-mask").count()
        page.evaluate("""() => {
            for (const d of document.querySelectorAll('.p-dialog-mask .p-dialog, .p-dialog-mask [role=dialog]')) {
                const b = [...d.querySelectorAll('button')].find(x =>
                    /close/i.test(x.getAttribute('aria-label') || '') || x.classList.contains('p-dialog-close-button')
                    || x.querySelector('.pi-times, .icon-\\[lucide--x\\]'));
                (b || d.querySelector('button'))?.click();
            }
        }""")
        page.keyboard.press("Escape")
        page.wait_for_function("(n) => document.querySelectorAll('.p-dialog-mask').length < n", arg=open_dialogs,
                               timeout=CAP_MS)
    page.evaluate("() => document.querySelectorAll('.p-toast-message').forEach(e => e.remove())")


def load_graph(page, ui):
    """Load a UI workflow into the frontend and wait until its graph holds every node."""
    page.evaluate("(wf) => app.loadGraphData(wf)", ui)
    page.wait_for_function("(n) => app.graph && app.graph._nodes.length === n", arg=len(ui["nodes"]), timeout=CAP_MS)


def finished_run(server, before: set):
    """Wait for the one prompt queued since ``before`` (history ids) to finish; its history entry."""
    def new_entry():
        hist = json.loads(_get(server["url"] + "/history")[1])
        new = [v for k, v in hist.items() if k not in before]
        return new[0] if new and new[0]["status"].get("completed") is not None else None
    return wait_until(new_entry, "the queued workflow")


def ours(errors):
    return [e for e in errors if "idportrait" in e.lower()]


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_example_loads_in_the_real_frontend(page, path):
    with open(path) as f:
        ui = json.load(f)
    page.evaluate("() => document.querySelectorAll('.p-toast-message').forEach(e => e.remove())")
    load_graph(page, ui)
    toasts = page.locator(".p-toast-message-content").all_inner_texts()
    assert not [t for t in toasts if "invalid" in t.lower() or "missing node" in t.lower()], toasts
    report = page.evaluate("""(wf) => {
        const registered = LiteGraph.registered_node_types;
        const byId = Object.fromEntries(wf.nodes.map(n => [n.id, n]));
        const out = {missing: [], drift: [], count: app.graph._nodes.length};
        const saved = app.graph.serialize();
        for (const n of saved.nodes) {
            if (!registered[n.type]) out.missing.push(n.type);
            const orig = byId[n.id];
            if (orig && JSON.stringify(orig.widgets_values ?? []) !== JSON.stringify(n.widgets_values ?? []))
                out.drift.push([n.type, orig.widgets_values, n.widgets_values]);
        }
        return out;
    }""", ui)
    assert report["count"] == len(ui["nodes"])
    assert report["missing"] == [], f"missing node types: {report['missing']}"
    assert report["drift"] == [], f"widget values changed on load/save: {report['drift']}"
    clear_overlays(page)
    page.screenshot(path=os.path.join(SHOTS, os.path.basename(path).replace(".json", ".png")))
    assert ours(page.idp_errors) == []


def test_run_button_executes_and_shows_identity_chip(page, server):
    ui = stand_in_ui(server["base"])
    load_graph(page, ui)
    before = set(json.loads(_get(server["url"] + "/history")[1]))
    clear_overlays(page)
    run = page.get_by_role("button", name="Run")
    if run.count():
        run.first.click()
    else:   # layout without the Run button label: queue through the app, as the button does
        page.evaluate("() => app.queuePrompt(0)")
    entry = finished_run(server, before)
    assert entry["status"]["status_str"] == "success", entry["status"]
    page.wait_for_selector(".idp-identity-chip", timeout=CAP_MS)
    chip = page.locator(".idp-identity-chip").first.inner_text()
    assert "identity from 2 images" in chip
    page.screenshot(path=os.path.join(SHOTS, "run_identity_chip.png"))
    assert ours(page.idp_errors) == []


def draw_box(page, node_type):
    """Create a node, drag a rectangle on its face-box editor with the mouse; return the node's widget values."""
    page.evaluate("""(t) => {
        app.graph.clear();
        const n = LiteGraph.createNode(t);
        n.pos = [80, 80];
        app.graph.add(n);
        app.canvas.ds.offset = [0, 0];
        app.canvas.ds.scale = 1;
        app.graph.setDirtyCanvas(true, true);
        window.__idpNode = n;
    }""", node_type)
    clear_overlays(page)
    editor = page.locator(".idp-facebox").first
    editor.wait_for(state="visible", timeout=CAP_MS)
    editor.scroll_into_view_if_needed()
    before = page.evaluate("() => JSON.stringify(window.__idpNode.widgets.map(w => w.value))")
    # the canvas lays the node's DOM widget out over a few frames: drag only once its box stops moving
    last = [None]

    def settled():
        box = editor.bounding_box()
        steady = box is not None and box == last[0] and box["width"] > 0
        last[0] = box
        return box if steady else None
    b = wait_until(settled, "the face-box editor's layout")
    page.mouse.move(b["x"] + 0.2 * b["width"], b["y"] + 0.3 * b["height"])
    page.mouse.down()
    page.mouse.move(b["x"] + 0.4 * b["width"], b["y"] + 0.5 * b["height"], steps=5)
    page.mouse.move(b["x"] + 0.6 * b["width"], b["y"] + 0.8 * b["height"], steps=5)
    page.mouse.up()
    page.wait_for_function("(v) => JSON.stringify(window.__idpNode.widgets.map(w => w.value)) !== v", arg=before,
                           timeout=CAP_MS)   # the editor wrote the dragged box into the widgets
    page.screenshot(path=os.path.join(SHOTS, f"face_box_{node_type}.png"))
    return page.evaluate("() => Object.fromEntries(window.__idpNode.widgets.map(w => [w.name, w.value]))")


def test_face_box_editor_writes_the_dragged_box(page):
    values = draw_box(page, "IDP_RBGuidanceSampler")
    box = [float(v) for v in values["region_box"].split(",")]
    assert box == pytest.approx([0.2, 0.3, 0.6, 0.8], abs=0.02)
    from idportrait.guidance import rb_guidance as rg
    mask = rg.box_mask(rg.parse_box(values["region_box"]), (100, 100))[0]   # the guidance region follows the box
    ys, xs = mask.nonzero(as_tuple=True)
    assert (xs.min().item(), ys.min().item()) == pytest.approx((20, 30), abs=2)
    assert (xs.max().item() + 1, ys.max().item() + 1) == pytest.approx((60, 80), abs=2)
    assert ours(page.idp_errors) == []


def test_face_box_editor_drives_flashface_box_and_mask(page):
    values = draw_box(page, "IDP_FlashFaceApply")
    box = [values[k] for k in ("face_x1", "face_y1", "face_x2", "face_y2")]
    assert box == pytest.approx([0.2, 0.3, 0.6, 0.8], abs=0.02)
    from idportrait.guidance import flashface as ff
    mask = ff.face_position_mask(box, (96, 96))          # 768 px canvas, as the released demo
    ys, xs = mask.nonzero(as_tuple=True)
    px = [int(v * 768) for v in box]
    side = max(px[2] - px[0], px[3] - px[1])             # released (fff0f078): max(x2 - x1, y2 - y1)
    assert (xs.min().item() * 8, ys.min().item() * 8) == pytest.approx((px[0], px[1]), abs=8)
    assert (ys.max().item() + 1) * 8 == pytest.approx(min(768, px[1] + side), abs=8)
    assert ours(page.idp_errors) == []


def test_old_ui_workflow_loads_and_runs_in_the_frontend(page, server):
    """A UI workflow saved before the stand-ins' 'seed' became 'weights_seed' loads as saved and runs."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "legacy", "tiny_sd15_ui_v0.1.0.json")) as f:
        ui = json.load(f)
    load_graph(page, ui)
    values = page.evaluate("""() => {
        const n = app.graph._nodes.find(n => n.type === 'IDP_TinyModels');
        return Object.fromEntries(n.widgets.map(w => [w.name, w.value]));
    }""")
    assert values["family"] == "sd15" and values["weights_seed"] == 5
    before = set(json.loads(_get(server["url"] + "/history")[1]))
    clear_overlays(page)
    page.evaluate("() => app.queuePrompt(0)")
    entry = finished_run(server, before)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert ours(page.idp_errors) == []


def test_rb_guidance_workflow_saved_before_match_and_reduction_keeps_cosine_and_mean(page):
    """The web extension's copy of nodes/migrations.py ADDED_INPUTS: an old UI workflow gets the old values on load
    in the real frontend, a current one keeps its own."""
    from idportrait.nodes import migrations as M
    mirror = page.evaluate("() => window.__IDPORTRAIT__.ADDED_INPUTS")
    assert mirror == {k: {"oldWidgets": a.old_widgets, "values": a.values} for k, a in M.ADDED_INPUTS.items()}
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "legacy", "rb_guidance_ui_v0.2.0.json")) as f:
        ui = json.load(f)
    read = """() => Object.fromEntries(app.graph._nodes.filter(n => n.type.startsWith('IDP_RBGuidance'))
        .map(n => [n.type, Object.fromEntries(n.widgets.filter(w => ['match', 'reduction', 'p'].includes(w.name))
                                                   .map(w => [w.name, w.value]))]))"""
    page.evaluate("(wf) => app.loadGraphData(wf)", ui)
    page.wait_for_timeout(300)
    got = page.evaluate(read)
    want = {"match": "cosine", "reduction": "mean", "p": 8.5}
    assert got == {"IDP_RBGuidanceGuider": want, "IDP_RBGuidanceSampler": want}
    with open(os.path.join(harness.REPO, "example_workflows", "flux_rb_guidance.json")) as f:
        page.evaluate("(wf) => app.loadGraphData(wf)", json.load(f))
    page.wait_for_timeout(300)
    assert page.evaluate(read)["IDP_RBGuidanceGuider"] == {"match": "euclidean", "reduction": "sum", "p": 8.5}
    assert ours(page.idp_errors) == []
