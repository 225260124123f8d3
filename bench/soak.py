"""Load-and-fault soak against a real ComfyUI server with the pack: does it stay correct, up and flat in memory?

  python bench/soak.py [--workflows 100] [--out bench/results/soak_cpu.json]   (from the repository root, with the
                                                                             embedded ComfyUI: COMFY_ROOT)

It starts a server on 127.0.0.1 (classic cache, so a repeated graph really runs again), then queues
``--workflows`` patched workflows: every example in example_workflows/ on stand-ins (converted as CI converts
them), round after round, with new seeds each time so nothing is served from the cache. Around each one it runs
a plain reference graph (tiny SD1.5, KSampler, the same seed before and after): the two latents must be
bit-identical, so no patched graph changed a model another graph uses. It records per workflow the status, wall
time and the server's RSS, then interrupts a long run at its first progress message and checks that the next run
is correct, and queues from two clients at once. Checks: every workflow succeeded, every before/after pair is
identical, the RSS high-water mark of every complete round after two warm-up rounds stays within ±5% of their
median (the per-workflow RSS is recorded too), the interrupt recovers, both clients get their result, and an
in-process pass counts the same live tensors, ModelPatchers, run states and injectors after every round. Writes the JSON, prints the RSS trend, exits 1 if a check failed. Bounded: a fixed number of
requests, each waiting on the server's own events with a hang cap.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "scripts"))

log = logging.getLogger("idportrait.soak")
RSS_BAND = 0.05
WARMUP_ROUNDS = 2   # RSS settles once every workflow has run twice (first allocations, then the allocator's reuse)


def plain_graph(seed: int, prefix: str, steps: int = 3) -> dict:
    return {
        "1": {"class_type": "IDP_TinyModels", "inputs": {"family": "sd15", "weights_seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "portrait photo of a person"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": seed, "steps": steps, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}},
    }


def reseed(api: dict, rng: random.Random) -> dict:
    """New seeds for every sampler of the graph (nothing cached); the stand-ins' weights_seed stays."""
    out = json.loads(json.dumps(api))
    for node in out.values():
        for name in ("seed", "noise_seed"):
            if name in node["inputs"] and not isinstance(node["inputs"][name], list):
                node["inputs"][name] = rng.randrange(2 ** 31)
    return out


def saved_latent(base: str, entry: dict, node: str = "6"):
    import safetensors.torch
    info = entry["outputs"][node]["latents"][0]
    path = os.path.join(base, "output", info["subfolder"], info["filename"])
    return safetensors.torch.load_file(path)["latent_tensor"]


def rss_mb(pid: int) -> float:
    import psutil
    return psutil.Process(pid).memory_info().rss / 2 ** 20


def pack_objects(examples, rounds: int, rng) -> list:
    """Every example (and the plain graph) ``rounds`` times in-process, in one executor with ComfyUI's classic cache
    as the server keeps it; after each round, what is still alive: tensors, ModelPatchers, run states, injectors."""
    import gc
    import warnings

    import torch

    import comfy.model_patcher
    import embedded_comfy
    import execution
    import stand_in_files
    from idportrait.guidance.patching import Injector
    from idportrait.guidance.run_state import RunState
    executor = execution.PromptExecutor(embedded_comfy._StubServer(), cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})

    def run(prompt):
        embedded_comfy.run_workflow(prompt, executor=executor)
        executor.server.events.clear()   # the stub server's message log is this tool's, not ComfyUI's or the pack's
        executor.server.times.clear()

    for _, ui, _ in examples:
        stand_in_files.prepare_files(ui, embedded_comfy.BASE_DIR)
    out = []
    for r in range(rounds):
        for _, _, api in examples:
            seed = rng.randrange(2 ** 31)
            run(plain_graph(seed, "soak/in_a"))
            run(reseed(api, rng))
            run(plain_graph(seed, "soak/in_b"))
        gc.collect()
        with warnings.catch_warnings():   # isinstance on every live object touches deprecated torch aliases
            warnings.simplefilter("ignore", FutureWarning)
            objs = gc.get_objects()
            tensors = [o for o in objs if isinstance(o, torch.Tensor) and not o.is_meta]
            counts = {"tensors": len(tensors),
                      "tensor_mb": round(sum(t.untyped_storage().nbytes() for t in tensors) / 2 ** 20, 2),
                      "model_patchers": sum(isinstance(o, comfy.model_patcher.ModelPatcher) for o in objs),
                      "run_states": sum(isinstance(o, RunState) for o in objs),
                      "injectors": sum(isinstance(o, Injector) for o in objs), "gc_objects": len(objs)}
        del objs, tensors   # the counting lists must not keep this round's objects alive into the next
        out.append(counts)
        log.info("in-process round %d: %s", r + 1, counts)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workflows", type=int, default=100, help="patched workflows to queue (default 100)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "soak_cpu.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--object-rounds", type=int, default=3,
                    help="rounds of every example in-process afterwards, counting the objects the pack keeps")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import embedded_comfy  # noqa: F401  (in-process ComfyUI + the pack: node definitions, stand-in writers)
    import torch
    import stand_in_files
    from comfy_server import http_post, run_over_http, running_server

    examples = []
    for f in sorted(os.listdir(os.path.join(REPO, "example_workflows"))):
        if f.endswith(".json"):
            with open(os.path.join(REPO, "example_workflows", f)) as fh:
                ui = json.load(fh)
            examples.append((f[:-5], ui, embedded_comfy.stand_in_api(ui)))
    rng = random.Random(a.seed)
    record = {"comfyui": getattr(__import__("comfyui_version"), "__version__", "?"), "torch": torch.__version__,
              "workflows": [], "pairs": []}
    t_start = time.time()
    with running_server(embedded_comfy.COMFY_DIR, REPO, extra_args=("--cache-classic",)) as srv:
        url, base, pid = srv["url"], srv["base"], srv["pid"]
        for _, ui, _ in examples:
            stand_in_files.prepare_files(ui, base)
        record["rss_mb_start"] = round(rss_mb(pid), 1)
        for i in range(a.workflows):
            name, _, api = examples[i % len(examples)]
            seed = rng.randrange(2 ** 31)
            _, before, _ = run_over_http(url, plain_graph(seed, f"soak/plain_{i}_a"))
            t0 = time.time()
            answer, entry, _ = run_over_http(url, reseed(api, rng))
            seconds = time.time() - t0
            _, after, _ = run_over_http(url, plain_graph(seed, f"soak/plain_{i}_b"))
            status = entry["status"]["status_str"] if entry else f"refused: {answer.get('node_errors') or answer}"
            same = (before["status"]["status_str"] == after["status"]["status_str"] == "success"
                    and torch.equal(saved_latent(base, before), saved_latent(base, after)))
            rss = rss_mb(pid)
            record["workflows"].append({"i": i, "name": name, "status": status, "seconds": round(seconds, 3),
                                        "rss_mb": round(rss, 1)})
            record["pairs"].append({"i": i, "identical": bool(same)})
            log.info("%3d %-40s %-8s %6.2f s  RSS %7.1f MB  plain before/after %s", i, name, status, seconds, rss,
                     "identical" if same else "DIFFERENT")

        # an interrupt during a long run, then a correct run
        interrupted = {"sent": False}

        def interrupt_at_first_progress(event):
            if event["type"] == "progress" and not interrupted["sent"]:
                interrupted["sent"] = True
                http_post(url + "/interrupt", {})
        seed = rng.randrange(2 ** 31)
        _, ref, _ = run_over_http(url, plain_graph(seed, "soak/interrupt_ref"))
        _, long_run, events = run_over_http(url, plain_graph(rng.randrange(2 ** 31), "soak/long", steps=500),
                                            on_event=interrupt_at_first_progress)
        _, again, _ = run_over_http(url, plain_graph(seed, "soak/interrupt_next"))
        record["interrupt"] = {
            "sent": interrupted["sent"], "long_run_status": long_run["status"]["status_str"],
            "ended_interrupted": any(e["type"] == "execution_interrupted" for e in events),
            "next_run_status": again["status"]["status_str"],
            "next_run_identical": bool(again["status"]["status_str"] == "success"
                                       and torch.equal(saved_latent(base, ref), saved_latent(base, again)))}

        # two clients queueing at once
        results = {}

        def client(k, graph):
            results[k] = run_over_http(url, graph)[1]
        threads = [threading.Thread(target=client, args=(k, reseed(examples[k][2], rng))) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        record["two_clients"] = [results[k]["status"]["status_str"] if results.get(k) else "missing" for k in range(2)]
        record["rss_mb_end"] = round(rss_mb(pid), 1)
    record["seconds_total"] = round(time.time() - t_start, 1)

    record["pack_objects_per_round"] = pack_objects(examples, a.object_rounds, rng)
    warmup = WARMUP_ROUNDS * len(examples)
    warm = [w["rss_mb"] for w in record["workflows"][warmup:]]
    median = statistics.median(warm) if warm else float("nan")
    record["rss_per_round_max_mb"] = [max(w["rss_mb"] for w in record["workflows"][k:k + len(examples)])
                                      for k in range(0, len(record["workflows"]), len(examples))]
    record["rss_after_warmup"] = {"warmup_workflows": warmup, "median_mb": round(median, 1),
                                  "min_mb": min(warm) if warm else None, "max_mb": max(warm) if warm else None,
                                  "max_deviation": round(max(abs(r / median - 1) for r in warm), 4) if warm else None}
    # Creep is judged on each round's high-water mark: a leak raises it round after round, while the RSS between
    # workflows also dips whenever the allocator hands a large temporary back (which is not a trend)
    n = len(examples)
    highs = [max(w["rss_mb"] for w in record["workflows"][k:k + n])
             for k in range(warmup, len(record["workflows"]) - n + 1, n)]
    high_median = statistics.median(highs) if highs else float("nan")
    record["rss_round_high_water_after_warmup"] = {
        "rounds": len(highs), "median_mb": round(high_median, 1), "values_mb": highs,
        "max_deviation": round(max(abs(r / high_median - 1) for r in highs), 4) if highs else None}
    checks = {
        "all_succeeded": all(w["status"] == "success" for w in record["workflows"]),
        "before_after_identical": all(p["identical"] for p in record["pairs"]),
        "rss_flat_after_warmup": bool(highs) and record["rss_round_high_water_after_warmup"]["max_deviation"] <= RSS_BAND,
        "interrupt_recovers": record["interrupt"]["ended_interrupted"] and record["interrupt"]["next_run_identical"],
        "two_clients": record["two_clients"] == ["success", "success"],
        # what the pack keeps between runs: the same after every round (ComfyUI's own cache holds one prompt's outputs)
        "pack_objects_flat": len({json.dumps({k: v for k, v in r.items() if k != "gc_objects"}, sort_keys=True)
                                  for r in record["pack_objects_per_round"][1:]}) <= 1,
    }
    record["checks"] = checks
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(record, f, indent=1)
    trend = [w["rss_mb"] for w in record["workflows"]]
    step = max(1, len(trend) // 10)
    log.info("RSS (MB) every %d workflows: %s", step, " ".join(f"{r:.0f}" for r in trend[::step]))
    log.info("after warm-up (%d workflows): median %.1f MB, range %s..%s, max deviation %.1f%% (band ±%.0f%%)",
             warmup, median, record["rss_after_warmup"]["min_mb"], record["rss_after_warmup"]["max_mb"],
             100 * (record["rss_after_warmup"]["max_deviation"] or 0), 100 * RSS_BAND)
    if not highs:
        log.warning("no complete round after the %d warm-up workflows: RSS flatness needs --workflows >= %d",
                    warmup, warmup + n)
    log.info("high-water mark of each complete round after warm-up: %s MB, max deviation %.1f%% (band ±%.0f%%)",
             " ".join(f"{r:.0f}" for r in highs), 100 * (record["rss_round_high_water_after_warmup"]["max_deviation"]
                                                     or 0), 100 * RSS_BAND)
    log.info("checks: %s", ", ".join(f"{k}={'ok' if v else 'FAILED'}" for k, v in checks.items()))
    log.info("wrote %s", a.out)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
