"""Runs the GPU smoke and every full-size bench in order, within a time budget, and writes one JSON each plus a
summary. Started by bench/gpu/run.sh (which sets up ComfyUI and the wheels); see there and the README.

  python bench/gpu/run_all.py --out DIR [--dry-run] [--budget S] [--parts a,b,...] [--isolate part|all]
                              [--pinned-comfy-dir DIR]

Parts, in order: smoke (every example workflow, normal and LOW_VRAM-offloaded), omni_id, flashface, rb_guidance,
infinite_id, train (bench/*_bench.py at the papers' resolutions, each a ratio to plain sampling measured side by
side, with peak VRAM), then two extras: smoke_pinned (the smoke on the pinned ComfyUI 0.3.75, when its tree is
given) and smoke_dynamic (the smoke with ComfyUI 0.33's DynamicVRAM; CUDA only). A part may run as long as it
needs while the time each later part keeps (``Part.keep``, scaled to the budget) stays free, so time a part leaves
unused goes to the later ones and an overrunning part is stopped before it eats theirs; a part that fails or runs
out of time is reported and the run goes on. ``--isolate part`` (default on a GPU) runs each part in its own process
(a CUDA error cannot leak into the next part, and its timeout is hard); ``--isolate all`` (the default of
--dry-run) runs the core parts in one worker process so ComfyUI boots once.

DIR receives at most 8 files (the device tool's limit): summary.json, smoke.json, omni_id.json, flashface.json,
rb_guidance.json, infinite_id.json, train.json and run.log; the extras' reports go into summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
from typing import NamedTuple, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BENCH = os.path.join(REPO, "bench")
FULL_BUDGET = 465.0   # what the keep times below are sized for: 8 minutes less the setup


class Part(NamedTuple):
    script: str
    gpu: list            # arguments on the GPU
    dry: Optional[list]  # arguments in the CPU dry run (None: the part needs CUDA)
    keep: float          # GPU seconds kept free for this part while earlier parts run


_DRY_SMOKE = ["sd15_omni_id_controlnet.json", "flashface_sd15_face_box.json", "flux_rb_guidance.json"]
PARTS = {   # in this order; the extras at the end get the time the others leave
    "smoke": Part("bench/gpu/smoke.py", ["--geometry", "full", "--offload", "all"],
                  ["--geometry", "dry", "--offload", _DRY_SMOKE[0], "--only", ",".join(_DRY_SMOKE)], 100),
    "omni_id": Part("bench/omni_id_bench.py", ["--full", "--families", "sd15,sdxl,flux", "--steps", "6", "--rounds", "2"],
                    ["--geometry", "dry", "--families", "flux", "--steps", "2", "--rounds", "1", "--size", "64"], 40),
    "flashface": Part("bench/flashface_bench.py", ["--full", "--steps", "10", "--rounds", "2"],
                      ["--geometry", "dry", "--steps", "1", "--rounds", "1", "--size", "64", "--in-process",
                       "--only", "flashface_plain_cfg,flashface_4ref_three_way"], 35),
    "rb_guidance": Part("bench/rb_guidance_bench.py", ["--full", "--families", "sd15,sdxl,flux", "--steps", "6"],
                        ["--geometry", "dry", "--families", "sd15", "--steps", "3", "--size", "64", "--in-process"], 75),
    "infinite_id": Part("bench/infinite_id_bench.py",
                        ["--full", "--families", "sdxl,flux", "--steps", "6", "--repeats", "2"],
                        ["--geometry", "dry", "--families", "sdxl", "--steps", "2", "--repeats", "1", "--size", "64"],
                        65),
    "train": Part("bench/train_bench.py", ["--full", "--steps", "3"], ["--geometry", "dry", "--steps", "1"], 60),
    # extras: the smoke on the pinned ComfyUI 0.3.75, and on 0.33 with DynamicVRAM (its default on NVIDIA; last,
    # as it runs comfy-aimdo's own allocator)
    "smoke_pinned": Part("bench/gpu/smoke.py", ["--geometry", "full", "--offload", "flux_omni_id.json"],
                         ["--geometry", "dry", "--offload", "none", "--only", "flux_omni_id.json"], 25),
    "smoke_dynamic": Part("bench/gpu/smoke.py", ["--geometry", "full", "--offload", "none", "--dynamic-vram"], None,
                          25),
}
ORDER = list(PARTS)


def part_argv(name: str, dry: bool, out_dir: str, deadline: float) -> list[str]:
    part = PARTS[name]
    argv = [os.path.join(REPO, part.script)] + (part.dry if dry else part.gpu)
    if name.startswith("smoke"):
        argv += ["--deadline", str(deadline), "--out", out_dir]
    else:
        argv += ["--out", os.path.join(out_dir, f"{name}.json")]
    return argv


# --- worker: runs parts in this process --------------------------------------------------------------------


def run_parts_here(parts: list[str], dry: bool, out_dir: str, work: str, deadlines: dict) -> None:
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    sys.path.insert(0, BENCH)
    if os.environ.get("IDP_BLOCK_ABSENT"):
        block_absent_modules()
    for name in parts:
        if time.time() > deadlines[name]:
            _write_status(work, name, {"ok": False, "error": "skipped: no time left", "seconds": 0.0})
            continue
        # the smoke stops starting workflows a little before its hard limit, so that it can write its report
        soft = deadlines[name] - 0.15 * max(0.0, deadlines[name] - time.time())
        argv = part_argv(name, dry, _part_dir(out_dir, work, name), soft)
        status = {"ok": False, "argv": argv[1:]}
        t = time.perf_counter()
        saved = sys.argv
        sys.argv = argv
        try:
            runpy.run_path(argv[0], run_name="__main__")
            status["ok"] = True
        except SystemExit as e:   # the smoke exits 1 when a workflow failed
            status["ok"] = e.code in (0, None)
            if not status["ok"]:
                status["error"] = f"exit status {e.code}"
        except BaseException as e:   # report and go on
            status["error"] = f"{type(e).__name__}: {e}"[:2000]
            status["traceback"] = traceback.format_exc()[-4000:]
            traceback.print_exc()
        finally:
            sys.argv = saved
        status["seconds"] = time.perf_counter() - t   # the first part of a worker includes ComfyUI's boot
        mm = sys.modules.get("comfy.model_management")
        if mm is not None:
            if mm.get_torch_device().type == "cuda":
                import torch
                status["cuda_peak_bytes_process"] = torch.cuda.max_memory_allocated()
            import builders
            builders.release()   # the next part of this worker starts with the memory free
        _write_status(work, name, status)


def absent_modules() -> list[str]:
    """Top-level modules that are neither on the GPU machine nor carried (bench/gpu/absent_on_gpu.txt)."""
    with open(os.path.join(HERE, "absent_on_gpu.txt")) as f:
        return [ln.split("#")[0].strip() for ln in f if ln.split("#")[0].strip()]


class _Absent:
    """A meta-path finder that makes the dry run see the GPU machine's packages: an unguarded import of something
    that will not be there fails here, in CI, instead of on the GPU."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine and not carried: "
                                      "see bench/gpu/absent_on_gpu.txt)", name=name)
        return None


def block_absent_modules() -> None:
    sys.meta_path.insert(0, _Absent(absent_modules()))


EXTRAS = ("smoke_pinned", "smoke_dynamic")


def _part_dir(out_dir: str, work: str, name: str) -> str:
    # the extra smokes' reports go into summary.json, not into OUT (at most 8 files come back)
    return os.path.join(work, name) if name in EXTRAS else out_dir


def _write_status(work: str, name: str, status: dict) -> None:
    path = os.path.join(work, "status.json")
    data = json.load(open(path)) if os.path.exists(path) else {}
    data[name] = status
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


# --- orchestrator ------------------------------------------------------------------------------------------


def headline(name: str, path: str) -> dict:
    """The figures a reader wants first, from a part's own JSON."""
    try:
        d = json.load(open(path))
    except (OSError, ValueError):
        return {}
    if name.startswith("smoke"):
        return {k: d.get(k) for k in ("passed", "failed", "skipped", "comfyui", "comfy_kitchen_backends")}
    if name in ("omni_id",):
        return {r["family"]: {"ratio": r["ratio"], "plain_step_s": r["plain_step_s"],
                              "peak_mem_plain": r.get("peak_mem_plain"), "peak_mem_omni_id": r.get("peak_mem_omni_id")}
                for r in d.get("runs", [])}
    if name == "rb_guidance":
        return {r["family"]: {"ratio": r["ratio"], "ratio_late": r["ratio_late"], "plain_step_s": r["plain_step_s"],
                              "peak_mem_plain": r["peak_mem_plain"], "peak_mem_guided": r["peak_mem_guided"]}
                for r in d.get("runs", [])}
    if name == "infinite_id":
        return {r["family"]: {k: v for k, v in r.items() if k.endswith("_vs_plain") and "cpu" not in k and "mean" not in k
                              or k.endswith("peak_mem_bytes") or k == "plain_step_s"} for r in d.get("runs", [])}
    if name == "flashface":
        return {"ratio_to_plain_two_way_cfg": d.get("ratio_to_plain_two_way_cfg"),
                "floor_ratio": (d.get("floor") or {}).get("floor_ratio"),
                "peak_mem_mb": {k: v.get("peak_mem_mb") for k, v in (d.get("results") or {}).items()}}
    if name == "train":
        return {f"{r['stage']}": {k: r.get(k) for k in ("step_s", "target_images_per_s", "peak_memory_bytes",
                                                          "ratio_to_plain_forward")} for r in d.get("runs", [])}
    return {}


def environment() -> dict:
    env = {"python": sys.version.split()[0], "comfy_dir": os.environ.get("COMFY_DIR"),
           "device": os.environ.get("IDP_COMFY_DEVICE", "cpu")}
    try:
        import torch
        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    except Exception as e:   # noqa: BLE001
        env["torch"] = f"unavailable: {e}"
    return env


def orchestrate(a) -> int:
    start = time.time()
    deadline = start + a.budget
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="idp-gpu-run-")   # status and the pinned smoke's report: outside OUT
    status_path = os.path.join(work, "status.json")
    parts = [p for p in ORDER if p in a.parts.split(",")] if a.parts else list(ORDER)
    skipped = {}
    if "smoke_pinned" in parts and not a.pinned_comfy_dir:
        skipped["smoke_pinned"] = "no pinned ComfyUI tree was carried"
    for p in parts:
        if a.dry_run and PARTS[p].dry is None:
            skipped[p] = "needs CUDA"
    parts = [p for p in parts if p not in skipped]
    # smoke_pinned runs another ComfyUI tree and smoke_dynamic must set up comfy-aimdo before ComfyUI: own processes
    own = [[p] for p in parts if p in EXTRAS]
    parts = [p for p in parts if p not in EXTRAS]
    groups = ([parts] if a.isolate == "all" and parts else [[p] for p in parts]) + own
    log = open(os.path.join(a.out, "run.log"), "a")
    summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": a.dry_run, "budget_s": a.budget,
               "environment": environment(), "parts": {}}
    for i, group in enumerate(groups):
        # a group may use all the time left but what the later parts keep; its parts share it by what they keep
        later = [p for g in groups[i + 1:] for p in g]
        timeout = max(1.0, deadline - time.time() - sum(PARTS[p].keep for p in later) * a.budget / FULL_BUDGET)
        deadlines, acc = {}, time.time()
        for p in group:
            acc += timeout * PARTS[p].keep / sum(PARTS[q].keep for q in group)
            deadlines[p] = acc
        env = dict(os.environ)
        if group == ["smoke_pinned"]:
            env["COMFY_DIR"] = a.pinned_comfy_dir
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--out", a.out, "--parts", ",".join(group),
               "--work", work, "--deadlines", json.dumps(deadlines)] + (["--dry-run"] if a.dry_run else [])
        log.write(f"\n===== {','.join(group)} (timeout {timeout:.0f} s) =====\n")
        log.flush()
        t = time.time()
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        log.flush()
        done = json.load(open(status_path)) if os.path.exists(status_path) else {}
        for p in group:
            st = done.get(p) or {"ok": False, "error": f"no result: the worker ended with {rc} after "
                                                       f"{time.time() - t:.0f} s (see run.log)"}
            out_json = os.path.join(_part_dir(a.out, work, p), "smoke.json" if p.startswith("smoke") else f"{p}.json")
            st["headline"] = headline(p, out_json)
            if p in EXTRAS and os.path.exists(out_json):
                st["report"] = json.load(open(out_json))
            summary["parts"][p] = st
            print(f"{p:13s} {'ok' if st['ok'] else 'FAILED'}  {st.get('seconds', 0):6.1f} s  "
                  f"{st.get('error', '')}", flush=True)
    for p, why in skipped.items():
        summary["parts"][p] = {"ok": None, "skipped": why}
    summary["total_s"] = time.time() - start
    summary["ok"] = all(s["ok"] for s in summary["parts"].values() if "skipped" not in s)
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    ran = [s for s in summary["parts"].values() if "skipped" not in s]
    print(f"summary: {sum(s['ok'] for s in ran)}/{len(ran)} parts ok ({len(skipped)} skipped) in "
          f"{summary['total_s']:.0f} s -> {os.path.join(a.out, 'summary.json')}", flush=True)
    return 0 if summary["ok"] else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: what CI runs")
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for all parts together")
    ap.add_argument("--parts", default="", help=f"comma list of {', '.join(ORDER)}")
    ap.add_argument("--isolate", choices=("part", "all"), default=None)
    ap.add_argument("--pinned-comfy-dir", default="", help="ComfyUI 0.3.75 tree for smoke_pinned")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--deadlines", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        run_parts_here(a.parts.split(","), a.dry_run, a.out, a.work, json.loads(a.deadlines))
        return
    a.isolate = a.isolate or ("all" if a.dry_run else "part")
    sys.exit(orchestrate(a))


if __name__ == "__main__":
    main()
