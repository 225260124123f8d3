"""After a GPU run: copy its JSONs into bench/results/gpu_*.json and print the README's figures as Markdown.

  python bench/gpu/collect.py FILES_AT [--results bench/results]

FILES_AT is the folder the device tool's reply names (``files_at``): summary.json, smoke.json and one JSON per bench.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("summary", "smoke", "omni_id", "flashface", "rb_guidance", "infinite_id", "train")


def _gb(b):
    return "–" if b is None else f"{b / 2**30:.1f} GB"


def _x(r):
    return "–" if r is None else f"{r:.2f}×"


def table(summary: dict) -> str:
    """The headline figures of summary.json as Markdown rows (what the README's GPU section shows)."""
    env = summary.get("environment", {})
    parts = summary.get("parts", {})
    rows = [f"GPU run: {env.get('gpu', 'no GPU')} · torch {env.get('torch', '?')} · "
            f"{summary.get('total_s', 0):.0f} s in all", "",
            "| part | result | figures (ratio to plain sampling, peak VRAM) |", "|---|---|---|"]
    for name, st in parts.items():
        if "skipped" in st:
            rows.append(f"| {name} | skipped | {st['skipped']} |")
            continue
        h = st.get("headline") or {}
        if name.startswith("smoke"):
            fig = f"{h.get('passed')} passed, {h.get('failed')} failed, {h.get('skipped')} skipped (ComfyUI {h.get('comfyui')})"
        elif name == "omni_id":
            fig = "; ".join(f"{f} {_x(v['ratio'])}, {_gb(v.get('peak_mem_omni_id'))}" for f, v in h.items())
        elif name == "rb_guidance":
            fig = "; ".join(f"{f} {_x(v['ratio'])} (late {_x(v['ratio_late'])}), {_gb(v.get('peak_mem_guided'))}"
                            for f, v in h.items())
        elif name == "infinite_id":
            fig = "; ".join(f"{f} {_x(v.get('infinite_id_vs_plain'))} (end_at 0.5 {_x(v.get('end_at_0.5_vs_plain'))}, "
                            f"merge only {_x(v.get('merge_only_vs_plain'))}), {_gb(v.get('infinite_id_peak_mem_bytes'))}"
                            for f, v in h.items())
        elif name == "flashface":
            r = h.get("ratio_to_plain_two_way_cfg") or {}
            fig = (f"4 refs three-way {_x(r.get('flashface_4ref_three_way'))}, 1 ref {_x(r.get('flashface_1ref_three_way'))}"
                   f", floor {_x(h.get('floor_ratio'))}")
        elif name == "train":
            fig = "; ".join(f"{s} {v.get('step_s', 0):.2f} s/step, {_gb(v.get('peak_memory_bytes'))}"
                            + (f", {_x(v['ratio_to_plain_forward'])} a plain forward" if v.get("ratio_to_plain_forward")
                               else "") for s, v in h.items())
        else:
            fig = ""
        rows.append(f"| {name} | {'ok' if st.get('ok') else 'FAILED: ' + str(st.get('error', ''))[:80]} | {fig} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files_at")
    ap.add_argument("--results", default=os.path.join(os.path.dirname(HERE), "results"))
    a = ap.parse_args()
    with open(os.path.join(a.files_at, "summary.json")) as f:
        summary = json.load(f)
    if summary.get("dry_run"):
        raise SystemExit("this is a CPU dry run's output, not a GPU run's: nothing copied")
    os.makedirs(a.results, exist_ok=True)
    for n in NAMES:
        src = os.path.join(a.files_at, f"{n}.json")
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(a.results, f"gpu_{n}.json"))
            print(f"copied {src} -> {os.path.join(a.results, f'gpu_{n}.json')}")
    print(table(summary))


if __name__ == "__main__":
    main()
