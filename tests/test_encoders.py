"""model.py's full-recipe parts: the KL-f8 autoencoder, the OpenCLIP text encoder, VideoCrafter2's checkpoint."""
import json
import sys
from dataclasses import replace

import pytest
import torch
from test_model import randomize

from conftest import regenerate_weights
from model import (KL_SIZES, SIZES, KLAutoencoder, ModelConfig, MotifModel, OpenCLIPTextEncoder, UNet, load_t2v_unet,
                   load_videocrafter2)

SCALE = 0.18215
CLIP_NAME = "motif-test-clip"  # a small open_clip config registered below: text width 64 = the tiny U-Net's context
CLIP_LAYERS = 3
CAPTIONS = ["the red circle moves left", "", "a very long caption " * 20]


# ----------------------------------------------------------------------------- the KL-f8 autoencoder

@pytest.fixture(scope="module")
def vae_reference(fixtures):
    """tests/fixtures/vae_kl_small.pt with its weights regenerated as "state_dict": frames of 24 x 40, factor 2."""
    reference = torch.load(fixtures / "vae_kl_small.pt", weights_only=True)
    return {**reference, "state_dict": regenerate_weights(reference["keys"])}


@pytest.fixture(scope="module")
def small_vae(vae_reference):
    vae = KLAutoencoder(KL_SIZES["small"])
    vae.load_state_dict(vae_reference["state_dict"])  # strict: our names are lvdm's
    return vae


@pytest.fixture(scope="module")
def tiny_vae_reference(shared):
    return torch.load(shared / "reference" / "vae_kl_f8_tiny.pt", weights_only=True)


@pytest.mark.parametrize("size", ["small", "tiny"])
def test_kl_autoencoder_matches_videocrafter_reference(size, request):
    reference = request.getfixturevalue("vae_reference" if size == "small" else "tiny_vae_reference")
    vae = KLAutoencoder(KL_SIZES[size])
    vae.load_state_dict(reference["state_dict"])  # strict: our names are lvdm's
    assert list(vae.state_dict()) == list(reference["state_dict"])  # same names, same order
    x = reference["inputs"]["x"]  # (2, 3, 24, 40) small, (2, 3, 64, 64) tiny
    h, w = x.shape[-2] // vae.factor, x.shape[-1] // vae.factor
    with torch.no_grad():
        moments = vae.quant_conv(vae.encoder(x))
        z = vae.encode(x[:, :, None])  # a one-frame video
        decoded = vae.decode(reference["posterior_mean"][:, :, None] * SCALE)
    assert (moments - reference["moments"]).abs().max() <= 1e-4
    assert z.shape == (2, 4, 1, h, w)
    assert (z[:, :, 0] / SCALE - reference["posterior_mean"]).abs().max() <= 1e-4  # mean x 0.18215
    assert decoded.shape == (2, 3, 1, *x.shape[-2:])
    assert (decoded[:, :, 0] - reference["decoded"]).abs().max() <= 1e-4  # latents / 0.18215 first


def test_full_kl_autoencoder_has_videocrafter2_parameter_shapes(fixtures):
    ref = json.loads((fixtures / "vae_kl_f8_full_keys.json").read_text())
    with torch.device("meta"):
        vae = KLAutoencoder(KL_SIZES["full"])
    assert [[k, list(v.shape)] for k, v in vae.state_dict().items()] == ref["state_dict"]
    assert sum(v.numel() for v in vae.state_dict().values()) == ref["params"] == 83_653_863
    assert (vae.latent_channels, vae.factor) == (4, 8)


def test_kl_autoencoder_codes_each_frame_alone_in_chunks():
    vae = randomize(KLAutoencoder(KL_SIZES["tiny"], frames_per_chunk=4))
    video = torch.rand(2, 3, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (B, 3, T, H, W)
    batches = []
    hooks = [m.register_forward_hook(lambda m, i, o: batches.append(len(i[0]))) for m in (vae.encoder, vae.decoder)]
    with torch.no_grad():
        z = vae.encode(video)
        decoded = vae.decode(z)
        frame_by_frame = [vae.encode(video[:, :, i:i + 1]) for i in range(3)]
    for hook in hooks:
        hook.remove()
    assert batches[:4] == [4, 2, 4, 2]  # 6 frames: a chunk of 4, then 2, to encode and to decode
    assert z.shape == (2, 4, 3, 2, 3) and decoded.shape == (2, 3, 3, 16, 24)
    assert torch.allclose(z, torch.cat(frame_by_frame, dim=2), atol=1e-5)  # frames do not see each other
    assert (z[:, :, 0] - z[:, :, 1]).abs().max() > 1e-2


def test_kl_autoencoder_samples_the_posterior(small_vae, vae_reference):
    x = vae_reference["inputs"]["x"][:, :, None]  # (2, 3, 1, 24, 40)
    with torch.no_grad():
        mean = small_vae.encode(x)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))  # (2, 4, 1, 12, 20)
        draw = small_vae.encode(x, noise)
    logvar = vae_reference["posterior_logvar"][:, :, None]
    expected = (vae_reference["posterior_mean"][:, :, None] + torch.exp(0.5 * logvar) * noise) * SCALE
    torch.testing.assert_close(draw, expected, rtol=0, atol=1e-4)  # mean + std * noise, VideoCrafter's sample()
    assert (draw - mean).abs().max() > 1e-2  # random weights: a std far above the tolerance


# ----------------------------------------------------------------------------- the OpenCLIP text encoder

@pytest.fixture(scope="module")
def open_clip_with_small_config(tmp_path_factory):
    import open_clip
    path = tmp_path_factory.mktemp("open_clip") / f"{CLIP_NAME}.json"
    path.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": CLIP_LAYERS}}))
    open_clip.add_model_config(path)
    return open_clip


@pytest.fixture(scope="module")
def small_clip(open_clip_with_small_config):
    """A whole random CLIP (vision tower too) built by open_clip itself: VideoCrafter2's cond_stage_model.model."""
    torch.manual_seed(0)
    clip = open_clip_with_small_config.create_model(CLIP_NAME, pretrained=None).eval()
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(0.1 * torch.randn_like(p))  # LayerNorms away from (1, 0), the last block's output not tiny
    return clip


def clip_text_state(clip):
    return {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}  # what VideoCrafter2 keeps


def clip_penultimate(open_clip, clip, captions, layer=CLIP_LAYERS - 2):
    """open_clip's own forward: the text blocks' output after block `layer`, then ln_final."""
    out = clip.forward_intermediates(text=open_clip.tokenize(captions), text_indices=[layer],
                                     normalize_intermediates=True, intermediates_only=True)
    return out["text_intermediates"][0]  # (B, 77, width)


def test_openclip_encoder_is_videocrafter2_penultimate_layer(open_clip_with_small_config, small_clip):
    open_clip = open_clip_with_small_config
    encoder = OpenCLIPTextEncoder(CLIP_NAME)
    encoder.model.load_state_dict(clip_text_state(small_clip))  # strict: the names of CLIP without its vision tower
    assert not any("visual" in k for k in encoder.state_dict())
    tokens = encoder.tokenize(CAPTIONS)
    assert torch.equal(tokens, open_clip.tokenize(CAPTIONS))
    assert tokens[1, :3].tolist() == [49406, 49407, 0]  # the empty prompt: start, end, padding
    assert tokens[2, -1] == 49407  # a long caption is cut to 77 tokens, ending with the end token
    with torch.no_grad():
        ours = encoder(CAPTIONS)
        penultimate = clip_penultimate(open_clip, small_clip, CAPTIONS)
        last = clip_penultimate(open_clip, small_clip, CAPTIONS, layer=CLIP_LAYERS - 1)
    assert ours.shape == (3, 77, 64) and encoder.width == 64 and encoder.max_len == 77
    assert (ours - penultimate).abs().max() <= 1e-5
    assert (ours - last).abs().max() > 1e-2  # the last block is skipped, as VideoCrafter2 does
    assert (ours[0] - ours[1]).abs().max() > 1e-2  # the text matters


def test_openclip_encoder_is_frozen_and_stays_in_eval_mode(open_clip_with_small_config):
    encoder = OpenCLIPTextEncoder(CLIP_NAME)
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())


def test_openclip_vit_h_14_has_videocrafter2_shapes():
    with torch.device("meta"):
        encoder = OpenCLIPTextEncoder("ViT-H-14")
        context = encoder(["a cat walks", ""])
    block = {"ln_1.weight": [1024], "ln_1.bias": [1024], "attn.in_proj_weight": [3072, 1024],
             "attn.in_proj_bias": [3072], "attn.out_proj.weight": [1024, 1024], "attn.out_proj.bias": [1024],
             "ln_2.weight": [1024], "ln_2.bias": [1024], "mlp.c_fc.weight": [4096, 1024], "mlp.c_fc.bias": [4096],
             "mlp.c_proj.weight": [1024, 4096], "mlp.c_proj.bias": [1024]}
    expected = {"model.token_embedding.weight": [49408, 1024], "model.positional_embedding": [77, 1024],
                "model.ln_final.weight": [1024], "model.ln_final.bias": [1024], "model.text_projection": [1024, 1024],
                "model.logit_scale": [],
                **{f"model.transformer.resblocks.{i}.{k}": s for i in range(24) for k, s in block.items()}}
    assert {k: list(v.shape) for k, v in encoder.state_dict().items()} == expected
    assert sum(v.numel() for v in encoder.state_dict().values()) == 354_032_641
    assert context.shape == (2, 77, 1024)


def test_openclip_without_the_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        OpenCLIPTextEncoder("ViT-H-14")


# ----------------------------------------------------------------------------- the full-recipe model

def test_full_recipe_model_trains_only_the_unet():
    with torch.device("meta"):
        model = MotifModel(ModelConfig(size="vc2", autoencoder="kl-f8", text_encoder="openclip"))
    unet = model.unet
    assert (unet.cfg.in_channels, unet.cfg.out_channels, unet.cfg.context_dim) == (8, 4, 1024)
    assert unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features == 1024
    assert model.resolution_factor == 64  # 8 (autoencoder) x 8 (three U-Net downsamplings): 320x512 fits
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(list(unet.parameters())) and all(a is b for a, b in zip(trainable, unet.parameters()))
    model.train()
    assert unet.training and not model.autoencoder.training and not model.text_encoder.training


def test_demo_model_trains_its_bytes_text_encoder_too():
    model = MotifModel(ModelConfig(size="tiny", autoencoder="kl-f8", kl_size="tiny"))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for m in (model.unet, model.text_encoder) for p in m.parameters()}
    assert model.autoencoder.latent_channels == 4 and model.unet.cfg.in_channels == 8


@pytest.mark.parametrize("change, message", [(dict(autoencoder="vq-f4"), "unknown autoencoder"),
                                             (dict(text_encoder="t5"), "unknown autoencoder/text encoder"),
                                             (dict(autoencoder="kl-f8", kl_size="huge"), "unknown kl-f8 size")])
def test_model_config_mistakes_are_value_errors(change, message):
    with pytest.raises(ValueError, match=message):
        MotifModel(ModelConfig(size="tiny", **change))


# ----------------------------------------------------------------------------- VideoCrafter2's checkpoint

@pytest.fixture(scope="module")
def t2v_unet():
    """A random text-to-video U-Net, as VideoCrafter2's: 4 input channels."""
    return randomize(UNet(replace(SIZES["tiny"], in_channels=4, temporal_dropout=0.0)), seed=3).eval()


@pytest.fixture(scope="module")
def vc2_checkpoint(tmp_path_factory, t2v_unet, vae_reference, small_clip):
    """A file of VideoCrafter2's model.ckpt layout, at small sizes, read back as train.py reads it."""
    state_dict = {"betas": torch.linspace(1e-4, 2e-2, 1000), "alphas_cumprod": torch.rand(1000),
                  **{"model.diffusion_model." + k: v for k, v in t2v_unet.state_dict().items()},
                  **{"first_stage_model." + k: v for k, v in vae_reference["state_dict"].items()},
                  **{"cond_stage_model.model." + k: v for k, v in clip_text_state(small_clip).items()}}
    path = tmp_path_factory.mktemp("vc2") / "model.ckpt"
    torch.save({"state_dict": state_dict, "epoch": 3}, path)
    return torch.load(path, weights_only=True)


def full_recipe_model(**change):
    cfg = ModelConfig(size="tiny", autoencoder="kl-f8", kl_size="small", text_encoder="openclip",
                      openclip_model=CLIP_NAME, temporal_dropout=0.0)
    return MotifModel(replace(cfg, **change)).eval()


def test_videocrafter2_checkpoint_loads_exactly(vc2_checkpoint, t2v_unet, small_clip, vae_reference,
                                                open_clip_with_small_config):
    model = full_recipe_model()
    report = load_videocrafter2(model, vc2_checkpoint)
    saved = vc2_checkpoint["state_dict"]
    n_clip = len(clip_text_state(small_clip))
    assert report == {"unet": {"loaded": 1482, "ignored": 0}, "autoencoder": {"loaded": 124, "ignored": 0},
                      "text_encoder": {"loaded": n_clip, "ignored": 0}, "other": {"loaded": 0, "ignored": 2}}
    for module, prefix in ((model.unet, "model.diffusion_model."), (model.autoencoder, "first_stage_model."),
                           (model.text_encoder, "cond_stage_model.")):
        for k, v in module.state_dict().items():
            if k != "input_blocks.0.0.weight":
                assert torch.equal(v, saved[prefix + k]), prefix + k
    first_conv = model.unet.input_blocks[0][0].weight  # (C_out, 8, 3, 3)
    assert torch.equal(first_conv[:, :4], saved["model.diffusion_model.input_blocks.0.0.weight"])
    assert (first_conv[:, 4:] == 0).all()  # the image-latent channels start at zero

    # the loaded TI2V model computes what the text-to-video model did, whatever the image latent
    g = torch.Generator().manual_seed(0)
    z_t, z_img = torch.randn(2, 4, 2, 8, 8, generator=g), torch.randn(2, 4, 2, 8, 8, generator=g)
    t, fps, captions = torch.tensor([3, 900]), torch.tensor([4, 24]), CAPTIONS[:2]
    with torch.no_grad():
        ours = model(z_t, z_img, t, captions, fps)
        theirs = t2v_unet(z_t, t, clip_penultimate(open_clip_with_small_config, small_clip, captions), fps)
        z = model.encode_video(vae_reference["inputs"]["x"][:, :, None])
    assert theirs.abs().max() > 0.1 and (ours - theirs).abs().max() <= 1e-5
    assert (z[:, :, 0] / SCALE - vae_reference["posterior_mean"]).abs().max() <= 1e-4


@pytest.mark.parametrize("wrapper", ["module.", "_orig_mod.", "module._orig_mod."])
def test_videocrafter2_checkpoint_loads_through_ddp_and_compile_prefixes(vc2_checkpoint, small_clip, wrapper):
    model = full_recipe_model()
    wrapped = {wrapper + k: v for k, v in vc2_checkpoint["state_dict"].items()}  # no {"state_dict": ...} either
    report = load_videocrafter2(model, wrapped)
    loaded = [report[part]["loaded"] for part in ("unet", "autoencoder", "text_encoder")]
    assert loaded == [1482, 124, len(clip_text_state(small_clip))] and report["other"]["ignored"] == 2
    saved = vc2_checkpoint["state_dict"]
    assert torch.equal(model.autoencoder.encoder.conv_in.weight, saved["first_stage_model.encoder.conv_in.weight"])
    unet = UNet(SIZES["tiny"])
    load_t2v_unet(unet, wrapped)  # the U-Net alone, from the same wrapped checkpoint
    assert torch.equal(unet.out[2].weight, saved["model.diffusion_model.out.2.weight"])


def test_videocrafter2_checkpoint_parts_the_model_does_not_use_are_ignored(vc2_checkpoint):
    model = full_recipe_model(text_encoder="bytes")  # its U-Net context is 64 wide, as the small CLIP's
    before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    report = load_videocrafter2(model, vc2_checkpoint)
    assert report["text_encoder"]["loaded"] == 0 and report["text_encoder"]["ignored"] > 0
    assert report["unet"]["loaded"] == 1482 and report["autoencoder"]["loaded"] == 124
    assert all(torch.equal(v, before[k]) for k, v in model.text_encoder.state_dict().items())


def test_videocrafter2_checkpoint_that_does_not_fit_is_refused_and_changes_nothing(vc2_checkpoint):
    saved = vc2_checkpoint["state_dict"]
    model = full_recipe_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wider_vae = KLAutoencoder(replace(KL_SIZES["small"], ch=64))
    wider_unet = UNet(replace(SIZES["tiny"], in_channels=4, model_channels=64, head_channels=32))
    other_vae = {"first_stage_model." + k: v for k, v in wider_vae.state_dict().items()}
    other_unet = {"model.diffusion_model." + k: v for k, v in wider_unet.state_dict().items()}
    without = lambda prefix: {k: v for k, v in saved.items() if not k.startswith(prefix)}  # noqa: E731
    cases = [({**without("first_stage_model."), **other_vae}, r"first_stage_model\.\* \(autoencoder\) does not fit"),
             ({**without("model.diffusion_model."), **other_unet}, "U-Net does not fit"),
             (without("cond_stage_model."), r"no cond_stage_model\.\* keys"),
             (without("first_stage_model."), r"no first_stage_model\.\* keys"),
             ({"state_dict": {"foo": torch.zeros(1)}}, r"no model\.diffusion_model\.\* keys")]
    for checkpoint, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            load_videocrafter2(model, checkpoint)
        assert "\n" not in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # checked before loading anything
