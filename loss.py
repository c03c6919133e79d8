"""Diffusion maths and the Motion Focal Loss.

Data flow (DESIGN.md): z0 from the autoencoder, a timestep t ~ U{0..999} and noise eps give
z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps and the v-target v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0.
The U-Net predicts v_hat; the loss is

    L = mean((v - v_hat)^2) + lambda * mean((m' * (v - v_hat))^2)

with m' the motion heatmap (flow.py) area-averaged to latent size. lambda = 0 is the plain
diffusion loss; the "inverse" mode weights static regions with 1 - m' (the paper's Inv-MotiF
ablation). Alongside, the squared error is split into high-motion and static regions (weighted by
m' and 1 - m') for the paper's loss-ratio analysis.
"""
import torch
import torch.nn.functional as F


def linear_alphas_cumprod(num_steps=1000, beta_start=0.00085, beta_end=0.012):
    """VideoCrafter2's linear schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2 -> abar (1000,) float64."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64, device="cpu") ** 2
    return torch.cumprod(1 - betas, dim=0)


class Schedule:
    """The noise schedule of training and sampling: alphas_cumprod (abar_t, float64), VideoCrafter2's by default (the
    CPU demo shifts it: demo.py), and the float32 coefficients of z_t and v."""

    def __init__(self, alphas_cumprod=None, device="cpu"):
        self.alphas_cumprod = linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        self.num_steps = len(self.alphas_cumprod)
        self.sqrt_abar = self.alphas_cumprod.sqrt().float().to(device)
        self.sqrt_one_minus_abar = (1 - self.alphas_cumprod).sqrt().float().to(device)

    def coefficients(self, t):
        """(B,) timesteps -> sqrt(abar_t), sqrt(1 - abar_t), each (B, 1, 1, 1, 1)."""
        shape = (-1, 1, 1, 1, 1)
        if self.sqrt_abar.device != t.device:  # moved once to where the timesteps are, not copied at every call
            self.sqrt_abar, self.sqrt_one_minus_abar = self.sqrt_abar.to(t.device), self.sqrt_one_minus_abar.to(t.device)
        return self.sqrt_abar[t].view(shape), self.sqrt_one_minus_abar[t].view(shape)


def q_sample(schedule, z0, t, noise):
    """Forward noising: z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps."""
    a, s = schedule.coefficients(t)
    return a * z0 + s * noise  # (B, C, T, h, w)


def v_target(schedule, z0, t, noise):
    """The v-prediction target: v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0."""
    a, s = schedule.coefficients(t)
    return a * noise - s * z0  # (B, C, T, h, w)


def latent_heatmap(heatmap, latent_size):
    """Pixel heatmap (B, T, H, W) -> area-averaged to latent size (B, 1, T, h, w)."""
    b, t, h, w = heatmap.shape
    pooled = F.interpolate(heatmap.reshape(b * t, 1, h, w).float(), size=latent_size, mode="area")  # (B*T, 1, h, w)
    return pooled.view(b, t, 1, *latent_size).transpose(1, 2)  # (B, 1, T, h, w)


def motif_loss(v_hat, v, m, lam=1.0, mode="motif"):
    """MotiF's loss, L = L_diffusion + lam * L_motif, with logging terms.

    v_hat, v: (B, C, T, h, w); m: the motion heatmap at latent size, the paper's m' (B, 1, T, h, w) in [0, 1].
    mode "motif" weights the error by m', "inverse" by 1 - m' (Inv-MotiF).
    Returns a dict: loss (to backprop), diffusion, motif, and the mean squared error inside
    high-motion regions (moving) and static regions (static), each weighted by m' or 1 - m'.
    """
    if mode not in ("motif", "inverse"):
        raise ValueError(f"unknown loss mode {mode!r}: use 'motif' or 'inverse'")
    err = (v - v_hat).float().square()  # (B, C, T, h, w)
    m = m.float().expand_as(err)  # (B, C, T, h, w)
    weight = m if mode == "motif" else 1 - m
    diffusion = err.mean()
    motif = (weight.square() * err).mean()  # mean((w * (v - v_hat))^2)
    with torch.no_grad():
        moving = (m * err).sum() / m.sum().clamp_min(1e-8)
        static = ((1 - m) * err).sum() / (1 - m).sum().clamp_min(1e-8)
    return {"loss": diffusion + lam * motif, "diffusion": diffusion, "motif": motif,
            "moving": moving, "static": static}
