"""The demo's outputs for people: a labelled contact sheet, report.md and report.json."""
from __future__ import annotations

import json
import os
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

TILE = 256            # image area of one tile (square)
CAPTION_LINES = 3
LINE_H = 15
CAPTION_H = CAPTION_LINES * LINE_H + 8
MARGIN = 8
HEADER_H = 44
COLUMNS = 4
BACKGROUND = (255, 255, 255)
TILE_BACKGROUND = (238, 238, 238)


def font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:     # Pillow without FreeType sizes
        return ImageFont.load_default()


def fit(img: Image.Image, size: int = TILE) -> Image.Image:
    """``img`` scaled to fit a size x size square (aspect kept, letterboxed on TILE_BACKGROUND); small stand-in
    images are enlarged with nearest-neighbour so their pixels stay visible."""
    img = img.convert("RGB")
    scale = size / max(img.width, img.height)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
    out = Image.new("RGB", (size, size), TILE_BACKGROUND)
    out.paste(img.resize((w, h), resample), ((size - w) // 2, (size - h) // 2))
    return out


def _clip_text(draw: ImageDraw.ImageDraw, text: str, fnt, width: int) -> str:
    if draw.textlength(text, font=fnt) <= width:
        return text
    while text and draw.textlength(text + "…", font=fnt) > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(tiles: list[dict], path: str, header: str, warning: str = "", columns: int = COLUMNS) -> dict:
    """tiles: [{"key", "image" (path), "caption": [3 lines]}]. Writes ``path``; returns the layout (per tile the
    image box and the caption box, in sheet pixels, and the caption lines as drawn)."""
    cols = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + cols - 1) // cols
    cell_w, cell_h = TILE + MARGIN, TILE + CAPTION_H + MARGIN
    width, height = MARGIN + cols * cell_w, HEADER_H + MARGIN + rows * cell_h
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((MARGIN, 6), _clip_text(draw, header, font(15), width - 2 * MARGIN), fill=(0, 0, 0), font=font(15))
    if warning:
        draw.text((MARGIN, 25), _clip_text(draw, warning, font(13), width - 2 * MARGIN), fill=(190, 0, 0), font=font(13))
    layout = {"file": os.path.basename(path), "size": [width, height], "tile": TILE, "columns": cols, "tiles": []}
    small = font(12)
    for i, t in enumerate(tiles):
        x0 = MARGIN + (i % cols) * cell_w
        y0 = HEADER_H + MARGIN + (i // cols) * cell_h
        sheet.paste(fit(Image.open(t["image"])), (x0, y0))
        lines = [_clip_text(draw, s, small, TILE) for s in (list(t["caption"]) + [""] * CAPTION_LINES)[:CAPTION_LINES]]
        for j, s in enumerate(lines):
            draw.text((x0, y0 + TILE + 4 + j * LINE_H), s, fill=(0, 0, 0) if j == 0 else (60, 60, 60), font=small)
        layout["tiles"].append({"key": t["key"], "box": [x0, y0, x0 + TILE, y0 + TILE],
                                "caption_box": [x0, y0 + TILE, x0 + TILE, y0 + TILE + CAPTION_H], "caption": lines})
    sheet.save(path)
    return layout


def _fmt(v, unit="", nd=3) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{nd}g}{unit}" if isinstance(v, float) else f"{v}{unit}"


def write_json(report: dict, out_dir: str) -> str:
    path = os.path.join(out_dir, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    return path


def metrics_cell(m: Optional[dict]) -> str:
    if not m:
        return "not run"
    if m.get("error"):
        return f"failed: {m['error']}"
    return ", ".join(f"{k} {_fmt(v)}" for k, v in m["ran"].items())


def write_markdown(report: dict, out_dir: str) -> str:
    L = ["# Identity Portrait demo", ""]
    if report["stand_in_models"]:
        L += ["**STAND-IN MODELS.** No weights were given (`--models-dir`), so every graph ran on tiny random models built "
              "from ComfyUI's classes: the images are noise by design. The graphs, the pack's code and the timings "
              "are real; the pictures are not portraits.", ""]
    else:
        L += [f"Models from `{report['models_dir']['models_dir']}` (real weights, found by their keys and metadata).", ""]
    ref = report["reference"]
    L += [f"ComfyUI {report['comfyui_version']}, booted in {report['boot_seconds']} s; whole run {report['total_seconds']} s. "
          f"ComfyUI's own log: `{report['log_file']}`.", "",
          f"Reference: {ref['source']} — {ref['faces']}", ""]
    if report.get("contact_sheet"):
        L += [f"![contact sheet]({report['contact_sheet']['file']})", ""]
    L += ["## Techniques", "",
          "| technique | example workflow | models | steps | size | seconds | s/step | plain s/step | × plain | face metrics | image |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in report["techniques"]:
        tm = t.get("timing") or {}
        size = "x".join(map(str, t["size"])) if t.get("size") else ""
        L.append(f"| {t['title']} | `{t['example']}` | {t['models_summary']} | {t.get('steps', '')} | {size} | "
                 f"{_fmt(tm.get('seconds'))} | {_fmt(tm.get('seconds_per_step'))} | "
                 f"{_fmt(tm.get('plain_seconds_per_step'))} | {_fmt(tm.get('relative_per_step'), '×')} | "
                 f"{metrics_cell(t.get('metrics'))} | {t.get('image') or t.get('status')} |")
    L += ["", "Per technique, `report.json` lists every model file (or stand-in) used, each timed run and the "
          "metrics in full.", "",
          "**Timing.** " + report["timing_method"], ""]
    if report.get("metrics_method"):
        L += ["**Face metrics.** " + report["metrics_method"], ""]
    reasons: dict = {}
    ran = [t for t in report["techniques"] if t.get("metrics")]
    for t in ran:
        for k, why in t["metrics"].get("not_run", {}).items():
            reasons.setdefault((k, why), []).append(t["title"])
    if reasons:
        L += ["Metrics that did not run, and why:", ""]
        for (k, why), titles in reasons.items():
            L.append(f"* `{k}`: {why}" + ("" if len(titles) == len(ran) else f" ({', '.join(titles)})"))
        L.append("")
    for t in report["techniques"]:
        if t.get("notes"):
            L += [f"* {t['title']}: " + " ".join(t["notes"])]
    if report.get("skipped"):
        L += ["", "## Skipped (the file that would enable each)", ""]
        for s in report["skipped"]:
            L.append(f"* **{s['title']}** (`{s['example']}`) needs:")
            for m in s["missing"]:
                L.append(f"  * {m['what']}: `{m['file']}` in `models/{m['folder']}`" + (f" ({m['url']})" if m.get("url") else ""))
    if report.get("failed"):
        L += ["", "## Failed", ""] + [f"* **{f['title']}**: {f['error']}" for f in report["failed"]]
    ignored = (report.get("models_dir") or {}).get("ignored")
    if ignored:
        L += ["", "## Files in the models folder that no technique uses", ""]
        L += [f"* `{i['file']}`: {i['why']}" for i in ignored]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    return path
