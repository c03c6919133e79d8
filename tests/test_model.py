"""model.py: parity with VideoCrafter2's U-Net, full-size shapes, x-cat, zero-init, conditioning."""
import json
from dataclasses import replace

import pytest
import torch

import model
from conftest import regenerate_weights
from demo.unet import DEMO
from model import (SIZES, Attention, BytesTextEncoder, ModelConfig, PixelAutoencoder, UNet, UNetConfig, build_unet,
                   load_t2v_unet)
from sample import build_model


def randomize(module, seed=0):
    """Every parameter non-zero (like the reference's init), so no branch hides behind a zero-init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5 if p.dim() > 1 else 1 + 0.1 * torch.randn(p.shape, generator=g))
    return module


# ----------------------------------------------------------------------------- parity with VideoCrafter's code

@pytest.fixture(scope="module")
def small_reference(fixtures):
    return torch.load(fixtures / "unet_vc2_small.pt", weights_only=True)


@pytest.fixture(scope="module")
def small_unet(small_reference):
    """tests/fixtures/unet_vc2_small.pt's U-Net: 6 frames of 16 x 24, the weights regenerated from its key list."""
    config = small_reference["config"]
    cfg = UNetConfig(model_channels=config["model_channels"], channel_mult=tuple(config["channel_mult"]),
                     num_res_blocks=config["num_res_blocks"], head_channels=config["num_head_channels"],
                     attention_levels=tuple(r.bit_length() - 1 for r in config["attention_resolutions"]),
                     context_dim=config["context_dim"])
    unet = UNet(cfg).eval()
    unet.load_state_dict(regenerate_weights(small_reference["keys"]))  # strict: our names and order are lvdm's
    assert [e["key"] for e in small_reference["keys"]] == [k for k, _ in unet.named_parameters()]
    return unet


@pytest.mark.parametrize("output, change", [("output", {}), ("output_t_changed", {"timesteps": 1}),
                                            ("output_fps_changed", {"fps": 2}), ("output_ctx_zero", {"context": 0})])
def test_matches_videocrafter_reference_at_the_compact_size(small_unet, small_reference, output, change):
    x = dict(small_reference["inputs"])
    for key, value in change.items():  # the probes: t + 1, fps + 2, a zero context
        x[key] = x[key] * 0 if key == "context" else x[key] + value
    with torch.no_grad():
        y = small_unet(x["x"], x["timesteps"], x["context"], x["fps"])
    assert y.shape == (2, 4, 6, 16, 24)
    assert (y - small_reference[output]).abs().max() <= 1e-4
    if change:  # each probe changes the output far beyond the tolerance
        assert (y - small_reference["output"]).abs().max() > 0.05


@pytest.fixture(scope="module")
def reference(shared):
    return torch.load(shared / "reference" / "unet_vc2_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny_unet(reference):
    unet = UNet(SIZES["tiny"]).eval()
    unet.load_state_dict(reference["state_dict"])  # strict: our names are VideoCrafter2's
    return unet


@pytest.mark.parametrize("output, inputs", [("output", "inputs"), ("output_t_changed", "inputs_t_changed"),
                                            ("output_fps_changed", "inputs_fps_changed")])
def test_matches_videocrafter_reference(tiny_unet, reference, output, inputs):
    x = {**reference["inputs"], **reference.get(inputs, {})}  # the changed inputs override the base ones
    with torch.no_grad():
        y = tiny_unet(x["x"], x["timesteps"], x["context"], x["fps"])
    assert (y - reference[output]).abs().max() <= 1e-4


def test_matches_reference_with_zero_context(tiny_unet, reference):
    x = reference["inputs"]
    with torch.no_grad():
        y = tiny_unet(x["x"], x["timesteps"], torch.zeros_like(x["context"]), x["fps"])
    assert (y - reference["output_ctx_zero"]).abs().max() <= 1e-4
    assert (y - reference["output"]).abs().max() > 0.1  # the text matters


def test_full_size_has_videocrafter2_parameter_shapes(fixtures):
    ref = json.loads((fixtures / "unet_vc2_full_keys.json").read_text())
    with torch.device("meta"):
        unet = UNet(SIZES["vc2"])
    ours = [(k, list(v.shape)) for k, v in unet.state_dict().items()]
    expected = [(k, [s[0], 8, *s[2:]] if k == "input_blocks.0.0.weight" else s) for k, s in ref["state_dict"]]
    assert ours == expected  # same names, order and shapes; 8 input channels (x-cat)
    assert sum(v.numel() for v in unet.state_dict().values()) == ref["params"] + 320 * 4 * 9


# ----------------------------------------------------------------------------- our own design

def test_fresh_unet_outputs_zero_because_of_zero_init():
    unet = UNet(replace(SIZES["tiny"], temporal_dropout=0.0))
    for name, p in unet.named_parameters():
        if name.endswith(("out_layers.3.weight", "proj_out.weight", "conv4.3.weight", "out.2.weight")):
            assert p.abs().max() == 0, name
    x = torch.randn(1, 8, 4, 16, 16)
    assert unet(x, torch.tensor([5]), torch.randn(1, 7, 64), torch.tensor([8])).abs().max() == 0


def test_zero_init_of_new_channels_keeps_a_loaded_t2v_model_identical():
    t2v = randomize(UNet(replace(SIZES["tiny"], in_channels=4))).eval()
    ti2v = UNet(SIZES["tiny"]).eval()
    load_t2v_unet(ti2v, {"model.diffusion_model." + k: v for k, v in t2v.state_dict().items()})
    z_t, z_img = torch.randn(2, 4, 4, 16, 16), torch.randn(2, 4, 4, 16, 16)
    args = torch.tensor([3, 900]), torch.randn(2, 5, 64), torch.tensor([4, 24])
    with torch.no_grad():
        before = t2v(z_t, *args)
        after = ti2v(torch.cat([z_t, z_img], 1), *args)
    assert torch.allclose(before, after, atol=1e-6)
    assert before.abs().max() > 0.1


def test_load_t2v_unet_refuses_a_state_dict_that_does_not_fit():
    ti2v = UNet(SIZES["tiny"])
    other = UNet(replace(SIZES["tiny"], model_channels=64, head_channels=32)).state_dict()
    with pytest.raises(ValueError, match="does not fit|size mismatch"):
        load_t2v_unet(ti2v, other)
    with pytest.raises(ValueError, match="not a VideoCrafter"):
        load_t2v_unet(ti2v, {"foo": torch.zeros(1)})


@pytest.fixture(scope="module")
def demo_model():
    model = randomize(build_model(ModelConfig(size="demo", pixel_patch=2, temporal_dropout=0.0)), seed=1).eval()
    return model


def test_xcat_image_latent_is_frame0_encoding_repeated(demo_model):
    video = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    z0 = demo_model.encode_video(video)
    z_img = demo_model.image_latent(z0)
    assert z_img.shape == z0.shape == (2, 12, 5, 16, 16)
    frame0 = demo_model.encode_video(video[:, :, :1])  # (2, 12, 1, 16, 16)
    assert torch.equal(z_img, frame0.expand_as(z0))
    # what the U-Net sees: noisy latent channels first, then the image latent
    seen = {}
    hook = demo_model.unet.input_blocks[0][0].register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    z_t = torch.randn_like(z0)
    with torch.no_grad():
        demo_model(z_t, z_img, torch.tensor([1, 2]), ["a", "b"], torch.tensor([8.0, 8.0]))
    hook.remove()
    x = seen["x"].view(2, 5, 24, 16, 16).transpose(1, 2)  # (B, 2C, T, h, w)
    assert torch.equal(x[:, :12], z_t) and torch.equal(x[:, 12:], z_img)


@pytest.mark.parametrize("change", ["t", "text", "image", "fps"])
def test_output_depends_on_every_condition(demo_model, change):
    g = torch.Generator().manual_seed(0)
    z_t, z_img = torch.randn(1, 12, 4, 16, 16, generator=g), torch.randn(1, 12, 4, 16, 16, generator=g)
    args = dict(t=torch.tensor([500]), text=["the red circle moves left"], image=z_img, fps=torch.tensor([8.0]))
    other = dict(t=torch.tensor([501]), text=["the red circle moves right"], image=z_img + 0.1, fps=torch.tensor([4.0]))
    with torch.no_grad():
        base = demo_model(z_t, args["image"], args["t"], args["text"], args["fps"])
        args[change] = other[change]
        changed = demo_model(z_t, args["image"], args["t"], args["text"], args["fps"])
    assert (base - changed).abs().max() > 1e-3


def test_input_skip_adds_a_blend_of_z_t_and_the_image_below_its_timestep():
    unet = build_unet(replace(DEMO, in_channels=24, out_channels=12, temporal_dropout=0.0)).eval()
    below = unet.cfg.input_skip_below
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 24, 4, 16, 16, generator=g), torch.randn(2, 7, 64, generator=g)
    t, fps = torch.tensor([below - 1, below]), torch.tensor([8.0, 8.0])
    with torch.no_grad():
        assert unet(x, t, context, fps).abs().max() == 0  # zero-init: a fresh (or loaded) model computes what it did
        weight_t, weight_img = torch.randn(12, generator=g), torch.randn(12, generator=g)
        unet.input_skip[1].bias.copy_(torch.cat([weight_t, weight_img]))
        y = unet(x, t, context, fps)
    expected = weight_t[:, None, None, None] * x[0, :12] + weight_img[:, None, None, None] * x[0, 12:]
    assert torch.allclose(y[0], expected, atol=1e-6)  # z_t's channels, then the image's
    assert y[1].abs().max() == 0  # from `below` on, the U-Net's own output only
    torch.nn.init.normal_(unet.input_skip[1].weight, generator=g)
    unet(x, t, context, fps).sum().backward()
    assert unet.input_skip[1].weight.grad.abs().max() > 0
    assert unet.time_embed[0].weight.grad.abs().max() == 0  # the skip does not train the embedding it reads


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = replace(SIZES["tiny"], temporal_dropout=0.0)
    plain = randomize(UNet(cfg))
    ckpt = UNet(replace(cfg, gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx, fps = torch.randn(1, 8, 4, 16, 16), torch.tensor([7]), torch.randn(1, 3, 64), torch.tensor([8])
    calls = []
    original = model.checkpoint
    model.checkpoint = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        for net in (plain, ckpt):
            net(x, t, ctx, fps).square().mean().backward()
    finally:
        model.checkpoint = original
    assert len(calls) == len(ckpt.input_blocks) + len(ckpt.output_blocks) + 2  # every stage, + init_attn, middle
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_bytes_text_encoder_reads_the_text():
    enc = BytesTextEncoder(32, max_len=16)
    tokens = enc.tokenize(["ab", "", "x" * 40])
    assert tokens[0, :3].tolist() == [97, 98, 256] and (tokens[1] == 256).all() and tokens[2].tolist() == [120] * 16
    out = enc(["left", "right"])
    assert out.shape == (2, 16, 32) and (out[0] - out[1]).abs().max() > 1e-3


def test_pixel_autoencoder_round_trip():
    ae = PixelAutoencoder(patch=4)
    video = torch.randn(2, 3, 3, 16, 24)
    z = ae.encode(video)
    assert z.shape == (2, 48, 3, 4, 6)
    assert torch.equal(ae.decode(z), video)
    assert torch.equal(z[:, :, 1], ae.encode(video[:, :, 1:2])[:, :, 0])  # frames stay separate


def test_attention_over_a_batch_past_the_cuda_grid_limit_goes_in_parts(monkeypatch):
    """Temporal attention's batch (B x h x w) can pass the 65,535 the fused CUDA kernels take: parts of it give the
    same result as the whole, here with the limit set to 4 for a batch of 10."""
    torch.manual_seed(0)
    x, text = torch.randn(10, 6, 32), torch.randn(2, 5, 24)
    sdpa, batches = model.F.scaled_dot_product_attention, []
    monkeypatch.setattr(model.F, "scaled_dot_product_attention", lambda q, k, v: batches.append(len(q)) or sdpa(q, k, v))
    for attention, context, parts in ((Attention(32, heads=2, head_dim=16), None, [4, 4, 2]),
                                      (Attention(32, heads=2, head_dim=16, context_dim=24), text, [2])):
        whole = attention(x, context)
        monkeypatch.setattr(model, "MAX_ATTENTION_BATCH", 4)
        batches.clear()
        assert torch.allclose(attention(x, context), whole, atol=1e-6) and batches == parts  # cross: B = 2 rows
        monkeypatch.setattr(model, "MAX_ATTENTION_BATCH", 65535)
