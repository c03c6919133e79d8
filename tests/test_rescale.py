"""The input rescaling of VideoCrafter2 and DynamiCrafter, and DynamiCrafter's zero-terminal-SNR betas, against their
own code: tests/fixtures/rescale_vc2.pt and rescale_dynamicrafter.pt (fixtures/README.md) hold q_sample, the v-target
and 10- and 50-step DDIM runs of both repositories on a stub denoiser; our loss.py and sample.py must give the same."""
from dataclasses import asdict

import pytest
import torch

import train
from conftest import user_error
from data import frames_to_tensor
from demo.bench import denoise_probe, ground_truth, held_out
from demo.unet import DEMO
from loss import Schedule, input_scale, linear_alphas_cumprod, q_sample, v_target, zero_terminal_snr
from model import ModelConfig, MotifModel, resolve_rescale
from sample import ddim, ddim_timesteps

RUNS = [(10, 1.0), (10, 7.5), (50, 7.5)]  # (DDIM steps, guidance scale), as stored


@pytest.fixture(scope="module")
def vc2(fixtures):
    return torch.load(fixtures / "rescale_vc2.pt", weights_only=True)


@pytest.fixture(scope="module")
def dynamicrafter(fixtures):
    return torch.load(fixtures / "rescale_dynamicrafter.pt", weights_only=True)


def stub(inputs, x, t, c):
    """The references' denoiser, 0.5 W x + 0.1 tanh(x) + 0.2 t / 1000 + 0.3 mean(c), per sample: read as eps by
    VideoCrafter2's sampler and as v by DynamiCrafter's."""
    per_sample = (-1, 1, 1, 1, 1)
    return (0.5 * torch.einsum("oc,bcthw->bothw", inputs["W"], x) + 0.1 * torch.tanh(x) + 0.2 * t / 1000
            + 0.3 * c.mean(1).view(per_sample))  # (B, C, T, h, w)


def test_input_scale_is_videocrafter2s_scale_arr(fixtures):
    ref = torch.load(fixtures / "schedule_vc2.pt", weights_only=True)["scale_arr"]
    assert torch.equal(input_scale(), ref[:1000])  # the 400 entries past 999 are never read


def test_q_sample_matches_videocrafter2(vc2):
    inputs = vc2["inputs"]
    z_t = q_sample(Schedule(rescale=True), inputs["z0"], inputs["t_train"], inputs["noise"])
    torch.testing.assert_close(z_t, vc2["q_sample"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("zero_snr", [False, True])
def test_forward_process_matches_dynamicrafter(dynamicrafter, zero_snr):
    ref, inputs = dynamicrafter[f"zero_snr_{zero_snr}"], dynamicrafter["inputs"]
    abar = zero_terminal_snr(linear_alphas_cumprod()) if zero_snr else linear_alphas_cumprod()
    torch.testing.assert_close(abar.float(), ref["alphas_cumprod"], rtol=0, atol=1e-7)
    schedule = Schedule(abar, rescale=True)
    z0, t, noise = inputs["z0"], inputs["t_train"], inputs["noise"]
    torch.testing.assert_close(schedule.rescaled(z0, t), ref["scaled_z0"], rtol=0, atol=1e-5)
    torch.testing.assert_close(q_sample(schedule, z0, t, noise), ref["z_t"], rtol=0, atol=1e-5)
    torch.testing.assert_close(v_target(schedule, z0, t, noise), ref["v_target"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps, cfg_scale", RUNS)
def test_ddim_matches_videocrafter2(vc2, steps, cfg_scale):
    """VideoCrafter2's model predicts eps; the same model as a v-predictor, v = (eps - sqrt(1 - abar) z) / sqrt(abar),
    through our DDIM must land where its sampler does. Its latents grow to about 150, where float32 steps are 1e-5:
    the tolerance is 1e-5 of the largest value (the runs differ by at most 1.1e-6 of it)."""
    inputs, ref = vc2["inputs"], vc2[f"ddim_{steps}_cfg{cfg_scale}"]
    schedule = Schedule(rescale=True)

    def predict(z, t):
        a = schedule.alphas_cumprod[t].item()
        return [(stub(inputs, z, t, c) - (1 - a) ** 0.5 * z) / a ** 0.5 for c in (inputs["cond"], inputs["uncond"])]

    z, _ = ddim(predict, inputs["x_T"], schedule, steps, cfg_scale)
    assert ddim_timesteps(steps) == ref["timesteps"].tolist()
    torch.testing.assert_close(z, ref["x0"], rtol=0, atol=1e-5 * ref["x0"].abs().max().item())


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("steps, cfg_scale", RUNS)
def test_ddim_matches_dynamicrafter(dynamicrafter, zero_snr, steps, cfg_scale):
    inputs, ref = dynamicrafter["inputs"], dynamicrafter[f"zero_snr_{zero_snr}"][f"ddim_{steps}_cfg{cfg_scale}"]
    abar = zero_terminal_snr(linear_alphas_cumprod()) if zero_snr else linear_alphas_cumprod()
    schedule = Schedule(abar, rescale=True)

    def predict(z, t):
        return stub(inputs, z, t, inputs["cond"]), stub(inputs, z, t, inputs["uncond"])

    z, x0 = ddim(predict, inputs["x_T"], schedule, steps, cfg_scale, dynamicrafter_end=True)
    torch.testing.assert_close(z, ref["x0"], rtol=0, atol=1e-5)
    # VideoCrafter2's last step renoises at s_0 = 1 instead: 0.075 % more of the clean prediction, far outside 1e-5
    z_vc2_end, x0_vc2_end = ddim(predict, inputs["x_T"], schedule, steps, cfg_scale)
    assert (z_vc2_end - ref["x0"]).abs().max() > 1e-3
    assert torch.equal(x0, x0_vc2_end)  # the decoded clean prediction is the same either way


def test_without_rescaling_the_arithmetic_is_unchanged():
    """Rescaling off (models from scratch, the CPU demo) must compute z_t and v exactly as before it existed."""
    schedule = Schedule()
    z0, noise, t = torch.randn(2, 4, 3, 5, 6), torch.randn(2, 4, 3, 5, 6), torch.tensor([150, 750])
    a, s = schedule.coefficients(t)
    assert schedule.scale is None
    assert torch.equal(q_sample(schedule, z0, t, noise), a * z0 + s * noise)
    assert torch.equal(v_target(schedule, z0, t, noise), a * noise - s * z0)


def test_rescale_is_on_for_the_videocrafter2_init_and_off_from_scratch():
    demo = asdict(train.load_config(["--preset", "shapes"]))
    assert train.Config().rescale == "auto" and not ModelConfig.from_run_config(demo).rescale  # the demo: off
    assert "rescale must be auto, true or false" in user_error(train.main, ["--preset", "shapes", "--rescale=on"])
    assert resolve_rescale("auto", "model.ckpt") and not resolve_rescale("auto", "")
    assert resolve_rescale("true", "") and not resolve_rescale("false", "model.ckpt")
    with pytest.raises(ValueError, match="rescale must be auto, true or false"):
        resolve_rescale("yes", "")
    recipe = {"model": "tiny", "init": "model.ckpt", "rescale": "auto"}
    assert ModelConfig.from_run_config(recipe).rescale
    assert not ModelConfig.from_run_config({"model": "tiny", "init": "model.ckpt"}).rescale  # a checkpoint from before


def test_ddim_with_rescaling_returns_the_unscaled_clean_latent():
    """An oracle that answers the exact v of s_t z0 (what a rescaled model learned) for a known z0: DDIM must land on
    z0 itself, not on 0.7 z0."""
    schedule = Schedule(rescale=True)
    z0 = torch.randn(2, 4, 3, 5, 6)

    def predict(z, t):
        a, scaled = schedule.alphas_cumprod[t].item(), schedule.scale[t].item() * z0
        noise = (z - a ** 0.5 * scaled) / (1 - a) ** 0.5
        v = a ** 0.5 * noise - (1 - a) ** 0.5 * scaled
        return v, v

    for steps in (1, 10, 50):
        _, x0 = ddim(predict, torch.randn(2, 4, 3, 5, 6), schedule, steps, 7.5)
        torch.testing.assert_close(x0, z0, rtol=0, atol=1e-4)


def test_posterior_draws_are_per_sample_and_leave_the_other_draws_alone():
    """Training's kl-f8 posterior sample: its N(0, 1) draws come from each sample's own generator, after t, the text
    dropout and the noise, so a run that samples the posterior draws the same t and noise as one that does not."""
    cfg, shape = train.Config(data="videos"), torch.Size((4, 2, 3, 3))
    t, noise, drop, none = train.draw_randomness(cfg, 3, [0, 5], shape, 1000)
    t2, noise2, drop2, eps_z0 = train.draw_randomness(cfg, 3, [0, 5], shape, 1000, posterior=True)
    assert none is None and eps_z0.shape == (2, *shape)
    assert torch.equal(t, t2) and torch.equal(noise, noise2) and drop == drop2
    alone = train.draw_randomness(cfg, 3, [5], shape, 1000, posterior=True)[3]
    assert torch.equal(alone[0], eps_z0[1])  # sample 5's draw whatever batch it is in
    assert not torch.equal(eps_z0, noise)


def test_the_denoise_probe_unscales_a_rescaled_models_prediction():
    """demo/bench.py's one-step probe: an oracle that gives back s_t x0, as a rescaled model learned, must score as the
    truth (shape PSNR > 50 dB at every probed t), so the probe divides by s_t."""


    class Oracle(MotifModel):
        def denoise(self, z_t, z_img, t, context, fps):
            abar = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1, 1).float()
            scaled = self.schedule.scale[t].view(-1, 1, 1, 1, 1) * self.answer.repeat(2, 1, 1, 1, 1)  # (2N, C, T, h, w)
            return (abar.sqrt() * z_t - scaled) / (1 - abar).sqrt()  # the v that gives back s_t x0 exactly

    cfg = asdict(train.load_config(["--preset", "shapes", "--rescale=true"]))
    model = Oracle(ModelConfig.from_run_config(cfg), DEMO).eval()
    assert model.schedule.scale is not None
    entries = [e for e in held_out(cfg, 4) if set(e["motions"].values()) != {"still"}]
    truth = ground_truth(entries, cfg["frames"])
    model.answer = model.encode_video(torch.stack([frames_to_tensor(v).transpose(0, 1) for v in truth]))
    with torch.no_grad():
        exact = denoise_probe(model, cfg, cfg_scale=2.0, images=4)
    assert min(exact["shape_psnr"]) > 50 and min(exact["first_frame_psnr"]) > 50
