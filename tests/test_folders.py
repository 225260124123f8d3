"""Loading the pack keeps what other packs registered for the same model folders (IPAdapter_plus's .bin files)."""
import json
import os
import subprocess
import sys
import textwrap

import harness

BOOT = textwrap.dedent("""
    import asyncio, json, os, sys
    comfy_dir, pack, base = sys.argv[1:4]
    sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args
    args.cpu = True
    import utils.extra_config
    import folder_paths
    folder = os.path.join(base, "ipadapter")
    # another pack (IPAdapter_plus) registered models/ipadapter with its own extensions before us
    folder_paths.folder_names_and_paths["ipadapter"] = ([folder], {".bin", ".safetensors"})
    import nodes
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    link = os.path.join(base, "custom_nodes", "idportrait")
    os.makedirs(os.path.dirname(link)); os.symlink(pack, link)
    assert asyncio.run(nodes.load_custom_node(link))
    print("RESULT " + json.dumps({"files": folder_paths.get_filename_list("ipadapter"),
                                  "paths": folder_paths.get_folder_paths("ipadapter")}))
""")


def test_a_folder_registered_before_the_pack_keeps_its_files(tmp_path):
    folder = tmp_path / "ipadapter"
    folder.mkdir()
    for name in ("ip-adapter-plus_sd15.bin", "ip-adapter-full-face_sd15.safetensors"):
        (folder / name).write_bytes(b"\0")
    res = subprocess.run([sys.executable, "-c", BOOT, harness.COMFY_DIR, harness.REPO, str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, res.stdout[-2000:] + res.stderr[-4000:]
    got = json.loads(line[len("RESULT "):])
    assert sorted(got["files"]) == ["ip-adapter-full-face_sd15.safetensors", "ip-adapter-plus_sd15.bin"]
    assert str(folder) in got["paths"]
    assert any(p.endswith(os.path.join("models", "ipadapter")) for p in got["paths"])   # and ours, models/ipadapter
