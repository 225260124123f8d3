"""bench/gpu: the CPU dry run of the GPU command (so it cannot rot between GPU sessions), its time budget, and what
it carries to the GPU machine."""
import json
import os
import re
import subprocess
import sys

import harness

GPU = os.path.join(harness.REPO, "bench", "gpu")
BENCH_PARTS = ["omni_id", "flashface", "rb_guidance", "infinite_id", "train"]
LIMIT = 64 * 2**20   # the device tool sends at most this much: working tree + carry


def run_sh(out, *extra, timeout=1500):
    env = dict(os.environ, COMFY_ROOT=harness.COMFY_ROOT, PYTHON=sys.executable)
    if os.environ.get("COMFY_DIR"):
        env["COMFY_DIR"] = harness.COMFY_DIR
    return subprocess.run(["bash", os.path.join(GPU, "run.sh"), "--dry-run", "--out", str(out), *extra], env=env,
                          cwd=harness.REPO, capture_output=True, text=True, timeout=timeout)


def _log(out):
    path = os.path.join(out, "run.log")
    return open(path).read()[-6000:] if os.path.exists(path) else ""


def test_dry_run_runs_every_part_and_writes_what_the_device_tool_brings_back(tmp_path):
    proc = run_sh(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + _log(tmp_path)
    files = sorted(os.listdir(tmp_path))
    # the device tool returns at most 8 files, named in letters, digits, '.', '_' and '-'
    assert files == sorted(["summary.json", "smoke.json", "run.log"] + [f"{p}.json" for p in BENCH_PARTS])
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["dry_run"] and summary["ok"]
    ran = {k: v for k, v in summary["parts"].items() if "skipped" not in v}
    assert list(ran) == ["smoke"] + BENCH_PARTS   # in the order
    assert all(p["ok"] and p["headline"] for p in ran.values()), summary["parts"]
    assert summary["parts"]["smoke_dynamic"]["skipped"] == "needs CUDA"
    assert "pinned" in summary["parts"]["smoke_pinned"]["skipped"]

    smoke = json.load(open(tmp_path / "smoke.json"))
    assert smoke["geometry"] == "dry" and smoke["failed"] == 0 and smoke["skipped"] == 0
    modes = {(r["workflow"], r["mode"]) for r in smoke["runs"]}
    assert {w for w, m in modes if m == "normal"} == {"sd15_omni_id_controlnet.json", "flashface_sd15_face_box.json",
                                                     "flux_rb_guidance.json"}
    assert ("sd15_omni_id_controlnet.json", "offload") in modes
    offload = next(r for r in smoke["runs"] if r["mode"] == "offload")
    assert offload["latent_diff_vs_normal"], "the offloaded pass is compared with the normal one"
    # every stand-in the swap makes ran through the pack's patch points (the probe saw the model calls)
    for r in smoke["runs"]:
        assert r["model_calls"] and all(c["calls"] > 0 for c in r["model_calls"].values()), r

    omni = json.load(open(tmp_path / "omni_id.json"))
    assert omni["geometry"] == "dry" and omni["runs"][0]["family"] == "flux" and omni["runs"][0]["ratio"] > 0
    rb = json.load(open(tmp_path / "rb_guidance.json"))
    assert rb["in_process"] and rb["runs"][0]["feature_point"] == "up:1"   # SD1.5's real layout: DIFT's point
    iid = json.load(open(tmp_path / "infinite_id.json"))
    assert iid["runs"][0]["family"] == "sdxl" and iid["runs"][0]["infinite_id_vs_plain"] > 0
    ff = json.load(open(tmp_path / "flashface.json"))
    assert ff["in_process"] and ff["ratio_to_plain_two_way_cfg"]["flashface_4ref_three_way"] > 0
    train = json.load(open(tmp_path / "train.json"))
    assert [r["stage"] for r in train["runs"]] == ["mtd", "flow"] and train["runs"][1]["ratio_to_plain_forward"] > 0

    # what a GPU session then runs to commit the results: the README's table from the summary; a dry run is refused
    sys.path.insert(0, GPU)
    import collect
    rows = collect.table(summary).splitlines()
    assert all(any(r.startswith(f"| {p} | ok |") for r in rows) for p in ran), rows
    proc = subprocess.run([sys.executable, os.path.join(GPU, "collect.py"), str(tmp_path), "--results",
                           str(tmp_path / "results")], capture_output=True, text=True)
    assert proc.returncode != 0 and "dry run" in proc.stderr and not os.path.exists(tmp_path / "results")


def test_a_part_out_of_time_is_reported_and_the_next_part_still_gets_its_share(tmp_path):
    # 4 s for two parts that each need ComfyUI's boot: both are stopped, both are reported, the summary is written
    proc = run_sh(tmp_path, "--parts", "omni_id,train", "--isolate", "part", "--budget", "4", timeout=120)
    assert proc.returncode == 1
    summary = json.load(open(tmp_path / "summary.json"))
    assert list(summary["parts"]) == ["omni_id", "train"] and not summary["ok"]
    for p in summary["parts"].values():
        assert not p["ok"] and "timeout" in p["error"]
    assert summary["total_s"] < 60


def tree_bytes():
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=harness.REPO,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum(os.path.getsize(os.path.join(harness.REPO, f.decode())) for f in files
               if f and os.path.isfile(os.path.join(harness.REPO, f.decode())))


def test_what_is_carried_fits_beside_the_working_tree():
    plan = [ln.split(None, 3) for ln in open(os.path.join(GPU, "carry_plan.txt")) if ln.strip() and ln[0] != "#"]
    required = sum(int(b) for _, b, kind, _ in plan if kind == "required")
    assert tree_bytes() + required + 2**18 <= LIMIT, "the working tree grew: the GPU run's essentials no longer fit"
    proc = subprocess.run(["bash", os.path.join(GPU, "prepare.sh"), "--list"], cwd=harness.REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "site.tar.xz" in proc.stdout and "comfyui-current.tar.xz" in proc.stdout
    total = int(re.search(r"total that travels .*?: (\d+) bytes", proc.stdout).group(1))
    assert total <= LIMIT


def test_the_gpu_machine_wheels_are_pinned_once_each():
    lines = [ln.split("#")[0].strip() for ln in open(os.path.join(GPU, "wheels.txt"))]
    pins = [ln for ln in lines if ln]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9_.]*", p) for p in pins), pins
    names = [p.split("==")[0].lower().replace("_", "-") for p in pins]
    assert len(names) == len(set(names))   # two versions of one package stop the whole install
    absent = {ln.split("#")[0].strip() for ln in open(os.path.join(GPU, "absent_on_gpu.txt"))} - {""}
    assert not absent & {"av", "kornia", "torchsde", "comfy_kitchen", "comfy_aimdo"}   # those are carried
