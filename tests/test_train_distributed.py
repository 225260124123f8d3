"""The training script under `accelerate launch` with 2 CPU processes (gloo, DDP) gives the gradients of one
process with the doubled batch. Both runs are subprocesses of the same script (omni_encoder/train/cli.py).

accelerate 1.15 runs `--cpu --num_processes 2` as ONE process unless MPI is set up (its simple launcher);
two gloo processes come from its torchrun-based launcher: `--multi_gpu` with ACCELERATE_USE_CPU=1."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import harness
from idportrait.omni_encoder.train import synthetic as S
from idportrait.omni_encoder.train.engine import train

CLI = os.path.join(harness.REPO, "omni_encoder", "train", "cli.py")
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")




def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, tmp_path, **extra_env):
    env = {**os.environ, **extra_env, "OMP_NUM_THREADS": "1", "COMFY_ROOT": os.path.dirname(harness.COMFY_DIR),
           "HF_HOME": str(tmp_path / "hf"), "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r.stdout + r.stderr


def _step_loss(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return next(json.loads(line)["loss"] for line in f if '"loss"' in line)


@pytest.mark.skipif(not os.path.isfile(ACCELERATE), reason="accelerate is not installed in this environment")
def test_two_processes_match_one_process_with_the_doubled_batch(tmp_path):
    root = str(tmp_path / "ds")
    S.make_identity_dataset(root, identities=4, images=8, size=56)
    cfg = S.tiny_config("mtd", root, str(tmp_path / "unused"), trunk={"trainable": True},
                        optim={"batch_size": 1, "max_steps": 1}, data={"num_inputs": [1, 3]})
    conf = str(tmp_path / "run.yaml")
    cfg.save(conf)
    two = _run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), CLI, "train", "--config", conf,
                "--set", f"output_dir={tmp_path / 'two'}", "--dump-grads", str(tmp_path / "g2.pt")], tmp_path,
               ACCELERATE_USE_CPU="1")
    assert "processes: 2" in two
    one = _run([sys.executable, CLI, "train", "--config", conf, "--set", f"output_dir={tmp_path / 'one'}",
                "optim.batch_size=2", "--dump-grads", str(tmp_path / "g1.pt")], tmp_path)
    assert "processes: 1" in one
    g2, g1 = torch.load(tmp_path / "g2.pt"), torch.load(tmp_path / "g1.pt")
    assert g1.keys() == g2.keys() and any(k.startswith("identity.trunk.") for k in g1)   # CLIP trunk trained too
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-7)
    assert _step_loss(tmp_path / "two") == pytest.approx(_step_loss(tmp_path / "one"), rel=1e-5)
    # control: one process with only the first half of the batch has other gradients (averaging happened)
    half = S.tiny_config("mtd", root, str(tmp_path / "half"), trunk={"trainable": True},
                         optim={"batch_size": 1, "max_steps": 1}, data={"num_inputs": [1, 3]})
    train(half, dump_grads=str(tmp_path / "gh.pt"))
    gh = torch.load(tmp_path / "gh.pt")
    assert any(not torch.allclose(gh[k], g1[k], rtol=1e-3, atol=1e-6) for k in g1)
