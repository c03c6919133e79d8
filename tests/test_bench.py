"""tools/bench.py at tiny sizes: its FLOP counting against independent counts, the fields it reports, every mode runs."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
from demo import shapes
from model import SIZES, UNet, training_flops
from tools import bench
from train import Config


def test_flops_of_a_linear_layer_forward_and_backward():
    n, d_in, d_out = 5, 7, 3
    layer = torch.nn.Linear(d_in, d_out, bias=False)
    x = torch.randn(n, d_in, requires_grad=True)
    # forward x W^T, backward dL/dx = g W and dL/dW = g^T x: three (n, d_in, d_out) matmuls of 2 n d_in d_out
    assert bench.count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * n * d_in * d_out


def explicit_attention(q, k, v):
    return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_attention_flops_match_an_explicit_matmul_count(device):
    b, h, lq, lk, d = 2, 3, 10, 6, 4
    q, k, v = (torch.randn(b, h, length, d, device=device, requires_grad=True) for length in (lq, lk, lk))
    matmul = 2 * b * h * lq * lk * d  # one of Q K^T or P V
    explicit = bench.count_flops(lambda: explicit_attention(q, k, v).sum().backward())
    assert explicit == 2 * matmul + 4 * matmul  # forward: 2 matmuls; backward: 2 gradients each
    bench.register_cpu_sdpa_flops()
    sdpa = bench.count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    if device == "meta":  # what bench.py counts: SDPA decomposes into the explicit matmuls
        assert sdpa == explicit
    else:  # the CPU flash kernel, with the registered formulas: as PyTorch counts its GPU kernels, whose
        assert sdpa == explicit + matmul  # backward recomputes Q K^T once


def state_of(unet):
    return bench.TrainState(Config(), unet, unet, torch.optim.AdamW(unet.parameters()), {}, bench.nullcontext(),
                            torch.device("cpu"))


def test_model_flops_of_a_tiny_unet_match_a_count_on_the_cpu_and_train_pys_mfu_count():
    """bench.py's meta-device count of a step equals what the CPU executes with attention as plain matmuls, and
    train.py's per-clip count (its MFU) times the batch."""
    cfg = SIZES["tiny"]
    opts = bench.resolve(bench.Options(size="tiny", batch=3, frames=2, latent="8x8", context_len=5))
    inputs = bench.make_inputs(opts, cfg, torch.device("cpu"), 0)
    unet = UNet(cfg).train()
    run = {"name": "ours", "model": unet, "call": bench.call_ours, "state": state_of(unet)}
    meta = bench.step_flops(opts, run, cfg, inputs, bench.nullcontext())
    with sdpa_kernel(SDPBackend.MATH):  # attention as plain matmuls on the CPU too
        cpu = bench.count_flops(lambda: bench.forward_backward(unet, bench.call_ours, inputs))
    assert meta == cpu == training_flops(cfg, frames=2, latent_size=(8, 8), context_len=5) * 3 > 0


def test_bench_size_is_vc2_shaped():
    """The comparison network has vc2's heads (64 channels wide; the init temporal attention 8 of them) at a fifth of
    its width, and vc2's layout of blocks."""
    cfg = bench.SIZES["bench"]
    with torch.device("meta"):
        unet, vc2 = UNet(cfg), UNet(SIZES["vc2"])
    attentions = [m for m in unet.modules() if type(m).__name__ == "Attention"]
    assert {a.to_q.out_features // a.heads for a in attentions} == {SIZES["vc2"].head_channels}
    assert unet.init_attn[0].transformer_blocks[0].attn1.heads == SIZES["vc2"].init_attn_heads
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    assert [s[0].in_layers[2].out_channels for s in unet.input_blocks[1:] if type(s[0]).__name__ == "ResBlock"] == \
        [w for w in widths for _ in range(cfg.num_res_blocks)]
    assert [type(m).__name__ for m in unet.modules()] == [type(m).__name__ for m in vc2.modules()]
    assert unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features == cfg.context_dim


def run_bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    results = bench.main([*args, "--json", str(out), "--threads", "1"])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(results))
    return results


def test_training_step_reports_sane_fields(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.CONTENDERS, "twin", bench.CONTENDERS["ours"])  # a second contender, no baseline needed
    results = run_bench(tmp_path, "--size", "tiny", "--batch", "2", "--frames", "2", "--latent", "8x8",
                        "--steps", "2", "--warmup", "0", "--compare", "twin", "--isolate-memory", "false",
                        "--flops", "device")  # what the CPU executes: the meta-device count is tested above
    ours, twin = results
    assert ours["name"] == "ours" and twin["name"] == "twin"
    assert ours["params"] == sum(p.numel() for p in UNet(SIZES["tiny"]).parameters())
    for r in results:
        assert 0 < r["step_min_s"] <= r["step_s"] <= r["step_max_s"]
        assert r["clips_per_s"] == pytest.approx(2 / r["step_s"])
        assert r["flops"] > 0 and r["flop_per_s"] == pytest.approx(r["flops"] / r["step_s"])
        assert "mfu" not in r  # CPU
    assert ours["flops"] == twin["flops"]
    assert 0 < twin["ours_speedup_min"] <= twin["ours_speedup"] <= twin["ours_speedup_max"]


def test_training_step_alone_reports_peak_memory(tmp_path):
    (result,) = run_bench(tmp_path, "--size", "tiny", "--batch", "1", "--frames", "2", "--latent", "8x8",
                          "--steps", "1", "--warmup", "0", "--flops", "none", "--checkpointing")
    assert result["flops"] is None and 0.05 < result["peak_memory_gib"] < 64


def test_sample_runs_at_a_tiny_size(tmp_path):
    (result,) = run_bench(tmp_path, "--what", "sample", "--size", "tiny", "--kl-size", "tiny", "--frames", "2",
                          "--latent", "8x8", "--ddim-steps", "2", "--steps", "1", "--warmup", "0")
    assert result["step_s"] > 0 and result["flops"] > 0 and "kl-f8" in result["note"]


def test_heatmap_runs_at_a_tiny_size(tmp_path, fixtures):
    (result,) = run_bench(tmp_path, "--what", "heatmap", "--size", "32x48", "--frames", "2", "--steps", "1",
                          "--warmup", "0", "--raft", str(fixtures / "raft_small.pth"))
    assert result["name"] == "heatmap 32x48" and result["step_s"] > 0 and result["flops"] > 0


@pytest.mark.parametrize("args, message", [(["--size", "huge"], "no model size"), (["--latent", "32"], "HxW"),
                                           (["--latent", "36x36"], "multiples of 8"),
                                           (["--what", "heatmap", "--size", "tiny"], "HxW"),
                                           (["--compare", "nope"], "unknown contender"),
                                           (["--size", "tiny", "--compare", "videocrafter"], "--videocrafter PATH"),
                                           (["--what", "data", "--data", "nowhere"], "needs --data, a video folder")])
def test_bad_options_are_one_line_errors(args, message):
    with pytest.raises(SystemExit, match=message):
        bench.main([*args, "--json", ""])


def test_data_measures_a_folder_today_and_now(tmp_path, fixtures, monkeypatch):
    """--what data on two 256 px shapes clips: decode both ways, RAFT at full size against RAFT at 128 px (fewer
    FLOPs), caches 64x smaller raw at 1/8 size, m' close, and the loader with and without the heatmap cache.
    (The GPU estimate's FLOPs are unet_training_flops, tested above, and the encoder's: left out here, for time.)"""
    monkeypatch.setattr(bench, "gpu_appetite", lambda opts, size, raft_pair_flops: {
        "name": "gpu estimate", "unet_flops": 1.0, "encode_flops": 1.0, "raft_flops": 1.0, "clips_per_s": {}})
    folder = tmp_path / "videos"
    folder.mkdir()
    for k, name in enumerate(["a.mp4", "b.gif"]):
        scene = shapes.make_scene(np.random.default_rng([7, k]), 256)
        video, _ = shapes.render_clip(scene, {0: shapes.allowed_motions(scene["objects"][0], 256)[1]}, frames=6)
        data.write_video(folder / name, video, fps=10)
    (folder / "captions.csv").write_text("path,caption\na.mp4,one\nb.gif,two\n")
    data.cache_heatmaps(folder, str(fixtures / "raft_small.pth"), (256, 256), 2, torch.device("cpu"))
    *videos, loader, _ = run_bench(tmp_path, "--what", "data", "--data", str(folder), "--size", "256x256",
                                   "--frames", "3", "--max-stride", "2", "--steps", "2", "--flow-clips", "1",
                                   "--raft", str(fixtures / "raft_small.pth"))
    assert [v["name"] for v in videos] == ["a.mp4", "b.gif"] and {"cache", "in the step"} <= set(loader)
    for v in videos:
        n = v["frames"]                     # 6, or fewer in the gif: Pillow merges a shape's repeated last frames
        assert n >= 4 and v["pairs_per_video"] == 2 * ((n - 1) + (n - 2)) and v["seconds"] == pytest.approx(0.6)
        assert all(v["decode_s"][w]["median"] > 0 and v["cache_read_s"][w] > 0 for w in ("today", "now"))
        assert v["raft_pair_gflop"]["today"] > 3 * v["raft_pair_gflop"]["now"]            # 256 px against 128 px
        raw = v["cache_raw_bytes_per_video_s"]
        assert raw["today"] == pytest.approx(64 * raw["now"]) and v["cache_bytes_per_video_s"]["now"] < raw["now"]
        assert v["m_mean_abs_difference"] < 0.05 and v["m_iou"] > 0.5


def test_channels_last_variant_is_ours_in_another_layout():
    cfg = SIZES["tiny"]
    opts = bench.resolve(bench.Options(size="tiny", batch=1, frames=2, latent="8x8", compare="channels-last"))
    inputs = bench.make_inputs(opts, cfg, torch.device("cpu"), 0)
    torch.manual_seed(0)
    ours = bench.build_ours(opts, cfg).eval()
    torch.manual_seed(0)
    variant = bench.build_channels_last(opts, cfg).eval()
    convs = [m for m in variant.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not ours.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(bench.call_ours(variant, inputs), bench.call_ours(ours, inputs))
    run = {"name": "channels-last", "model": variant, "call": bench.call_ours, "state": state_of(variant)}
    with sdpa_kernel(SDPBackend.MATH):  # ours' count as the CPU executes it (equal to the meta count, tested above)
        counted_ours = bench.count_flops(lambda: bench.forward_backward(ours.train(), bench.call_ours, inputs))
    assert bench.step_flops(opts, run, cfg, inputs, bench.nullcontext()) == counted_ours > 0  # the variant counts as ours


def test_roof_times_a_square_matmul(tmp_path):
    (result,) = run_bench(tmp_path, "--what", "roof", "--steps", "1", "--warmup", "0")
    assert result["name"] == "matmul 2048x2048" and result["flops"] == 2 * 2048 ** 3
    assert result["flop_per_s"] == pytest.approx(result["flops"] / result["step_s"])
