"""loss.py: the schedule against VideoCrafter2's, forward noising, v-target, and the motion focal loss by hand."""
import pytest
import torch

from loss import Schedule, latent_heatmap, motif_loss, q_sample, v_target


def test_schedule_matches_videocrafter2(fixtures):
    ref = torch.load(fixtures / "schedule_vc2.pt", weights_only=True)
    s = Schedule()
    betas = 1 - s.alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), s.alphas_cumprod[:-1]])
    assert torch.allclose(betas, ref["betas"].double(), rtol=0, atol=1e-15)
    assert torch.allclose(s.alphas_cumprod, ref["alphas_cumprod"].double(), rtol=0, atol=1e-12)


def test_q_sample_and_v_target_by_hand():
    s = Schedule()
    z0, noise = torch.full((1, 1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1, 1), -1.0)
    t = torch.tensor([600])
    a = s.alphas_cumprod[600].item()
    assert q_sample(s, z0, t, noise).item() == pytest.approx(a ** 0.5 * 2 - (1 - a) ** 0.5, rel=1e-6)
    assert v_target(s, z0, t, noise).item() == pytest.approx(-(a ** 0.5) - (1 - a) ** 0.5 * 2, rel=1e-6)


def test_v_parameterisation_recovers_z0_and_noise():
    s = Schedule()
    z0, noise = torch.randn(3, 4, 2, 5, 5), torch.randn(3, 4, 2, 5, 5)
    t = torch.tensor([0, 500, 999])
    z_t, v = q_sample(s, z0, t, noise), v_target(s, z0, t, noise)
    a, b = s.coefficients(t)
    assert torch.allclose(a * z_t - b * v, z0, atol=1e-5)
    assert torch.allclose(b * z_t + a * v, noise, atol=1e-5)


def test_latent_heatmap_is_an_area_average():
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0],
                      [1.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 1.0, 1.0],
                      [0.0, 0.0, 1.0, 1.0]])
    heat = torch.stack([m, 1 - m])[None]  # (B=1, T=2, 4, 4)
    out = latent_heatmap(heat, (2, 2))
    assert out.shape == (1, 1, 2, 2, 2)
    assert out[0, 0, 0].tolist() == [[0.75, 0.0], [0.0, 1.0]]
    assert out[0, 0, 1].tolist() == [[0.25, 1.0], [1.0, 0.0]]


def hand_case():
    v = torch.zeros(1, 2, 1, 1, 2)
    v_hat = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 2, 1, 1, 2)  # errors 1, 4 (channel 0), 9, 16 (channel 1)
    m = torch.tensor([1.0, 0.5]).view(1, 1, 1, 1, 2)  # pixel 0 moving, pixel 1 half
    return v_hat, v, m


def test_motif_loss_by_hand():
    v_hat, v, m = hand_case()
    out = motif_loss(v_hat, v, m, lam=1.0)
    assert out["diffusion"].item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    motif = (1 * 1 + 0.25 * 4 + 1 * 9 + 0.25 * 16) / 4  # mean((m * (v - v_hat))^2) = mean(m^2 err)
    assert out["motif"].item() == pytest.approx(motif)
    assert out["loss"].item() == pytest.approx(7.5 + motif)
    assert motif_loss(v_hat, v, m, lam=2.0)["loss"].item() == pytest.approx(7.5 + 2 * motif)
    # logging: error inside moving (weight m) and static (weight 1 - m) regions
    assert out["moving"].item() == pytest.approx((1 + 0.5 * 4 + 9 + 0.5 * 16) / (1 + 0.5 + 1 + 0.5))
    assert out["static"].item() == pytest.approx((0.5 * 4 + 0.5 * 16) / (0.5 + 0.5))


def test_lambda_zero_is_plain_mse():
    v_hat, v = torch.randn(2, 4, 3, 5, 5), torch.randn(2, 4, 3, 5, 5)
    m = torch.rand(2, 1, 3, 5, 5)
    out = motif_loss(v_hat, v, m, lam=0.0)
    assert torch.allclose(out["loss"], torch.nn.functional.mse_loss(v_hat, v))


def test_inverse_mode_weights_static_regions():
    v_hat, v, m = hand_case()
    out = motif_loss(v_hat, v, m, lam=1.0, mode="inverse")
    assert out["motif"].item() == pytest.approx((0 * 1 + 0.25 * 4 + 0 * 9 + 0.25 * 16) / 4)
    # a static-only error is invisible to MotiF's extra term and fully seen by the inverse one
    v_hat2 = torch.zeros(1, 1, 1, 1, 2)
    v_hat2[..., 1] = 1.0
    m2 = torch.tensor([1.0, 0.0]).view(1, 1, 1, 1, 2)
    assert motif_loss(v_hat2, torch.zeros_like(v_hat2), m2)["motif"].item() == 0
    assert motif_loss(v_hat2, torch.zeros_like(v_hat2), m2, mode="inverse")["motif"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        motif_loss(v_hat, v, m, mode="sideways")


def test_motif_term_changes_the_gradient_only_where_things_move():
    v = torch.zeros(1, 1, 1, 1, 2)
    v_hat = torch.ones(1, 1, 1, 1, 2, requires_grad=True)
    m = torch.tensor([1.0, 0.0]).view(1, 1, 1, 1, 2)
    motif_loss(v_hat, v, m, lam=1.0)["loss"].backward()
    grad = v_hat.grad.flatten().tolist()
    assert grad[0] == pytest.approx(2 * grad[1])  # moving pixel: (1 + m^2) = 2x the static pixel's gradient
