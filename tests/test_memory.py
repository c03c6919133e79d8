"""tools/memory.py at tiny sizes: what it counts per rank, and the arithmetic of the full recipe's table."""
import json
import os
import subprocess
import sys
from pathlib import Path

from demo.unet import DEMO
from model import build_unet
from tools import memory

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_states_counts_each_kind_of_state(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.memory", "--what=states", "--size=demo", "--frames=4", "--latent=8x8",
                             "--steps=2", f"--out={tmp_path}"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(next(tmp_path.glob("states_demo_ddp1_*.json")).read_text())["result"]
    unet = build_unet(DEMO)  # what the run built: its parameters, and AdamW's step count per tensor
    params, tensors, rank = report["params"], len(list(unet.parameters())), report["ranks"][0]
    assert report["world"] == 1 and params == sum(p.numel() for p in unet.parameters())
    for kind, size in (("weights", 4 * params), ("gradients", 4 * params), ("ema", 4 * params),
                       ("adamw", 8 * params + 4 * tensors)):  # two fp32 moments, and fused AdamW's fp32 step count
        assert round(rank[f"{kind}_gib"] * memory.GIB) == size, kind
    assert rank["peak_gib"] > rank["start_gib"] > 0 and rank["step_s"] > 0


def fake_result(what, size, world=1, batch=1, dtype="bf16", parallel="ddp", **result):
    options = {**memory.dataclasses.asdict(memory.Options()), "what": what, "size": size, "batch": batch, "dtype": dtype,
               "parallel": parallel}
    return json.dumps({"options": options, "result": {"world": world, **result}})


def test_the_table_from_measured_figures(tmp_path):
    gib = memory.GIB
    params = 1000
    # two ranks of a sharded run, each with half of 4 + 4 + 8 + 4 bytes a parameter
    ranks = [{"weights_gib": 2000 / gib, "gradients_gib": 2000 / gib, "adamw_gib": 4000 / gib, "ema_gib": 2000 / gib,
              "peak_gib": 1.0, "start_gib": 0.5, "first_step_s": 2.0, "step_s": 1.0}] * 2
    (tmp_path / "s.json").write_text(fake_result("states", "bench", world=2, params=params, ranks=ranks, parallel="shard"))
    for name, voxels, act in (("a", 100, 9.0), ("b", 512, 1.0), ("c", 4096, 8.0)):  # the line of the two largest:
        # 2 GiB per 1024 voxels, through the origin
        (tmp_path / f"{name}.json").write_text(fake_result("activations", "vc2", voxels=voxels, activations_gib=act,
                                                           autocast_cache_gib=1.5))
    table = memory.compute_table(tmp_path)
    p = table["counts"]["trainable"] / gib
    assert table["bytes_per_parameter"] == {"weights": 4, "gradients": 4, "adamw": 8, "ema": 4}
    assert abs(table["activations"]["per_micro_batch_gib"][1] - 2 * 40960 / 1024) < 1e-9  # 16 x 40 x 64 latents
    assert abs(table["ddp_extra_gib"] - 1.5) < 1e-9
    rows = {(r["mode"], r["gpus"]): r for r in table["rows"]}
    assert rows["DDP", 8]["adamw"] == 8 * p and rows["sharded", 8]["adamw"] == p
    offload = rows["sharded + offload", 1]
    assert offload["weights"] == 0 and offload["cpu"] == 20 * p
    assert abs(offload["total"][2] - (offload["frozen"] + table["fsdp_working_gib"] + 2 * 80)) < 1e-9
