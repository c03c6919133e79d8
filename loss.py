"""Diffusion maths and the Motion Focal Loss.

Data flow (DESIGN.md): z0 from the autoencoder, a timestep t ~ U{0..999} and noise eps give
z_t = sqrt(abar_t) s_t z0 + sqrt(1 - abar_t) eps and the v-target v = sqrt(abar_t) eps - sqrt(1 - abar_t) s_t z0,
where s_t is VideoCrafter2's input rescaling (1 -> 0.7 over t < 400, then 0.7) when the schedule has it, else 1.
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


def zero_terminal_snr(abar):
    """DynamiCrafter's `rescale_zero_terminal_snr` (Lin et al. 2024, Algorithm 1) on abar (float64): sqrt(abar) shifted
    so that the last step is pure noise and scaled so that t = 0 keeps its value. Without it VideoCrafter2's t = 999
    keeps sqrt(abar) = 0.068 of the clip, which training never removes and sampling's pure-noise start lacks."""
    root = abar.sqrt()
    return ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2


def shift_snr(abar, shift=1.0):
    """The schedule's abar (float64) changed for small frames, where VideoCrafter2's leaves the content visible even
    at t = 999 (model.py applies it when the config's noise_shift asks: the demo's preset sets 2): the signal-to-noise
    ratio abar / (1 - abar) divided by shift^2 at every t (as SD3 and "simple diffusion" shift a schedule for another
    resolution): shift > 1 hides coarse content, such as where a shape goes, over more of the timesteps, where only
    the text can then tell it."""
    return abar / (abar + shift ** 2 * (1 - abar))


def input_scale(num_steps=1000, base=0.7, turning_step=400):
    """VideoCrafter2's `scale_arr` (use_scale, scale_b 0.7, mid_step 400), kept by DynamiCrafter as
    `use_dynamic_rescale` (base_scale 0.7, turning_step 400): s_t = linspace(1, 0.7, 400)[t] for t < 400, then 0.7
    (1000,) float32. z0 is multiplied by s_t before noising, so a checkpoint that learned this sees inputs up to
    1 / 0.7 louder without it."""
    ramp = torch.linspace(1.0, base, turning_step, dtype=torch.float64)
    return torch.cat([ramp, torch.full((num_steps - turning_step,), base, dtype=torch.float64)]).float()


class Schedule:
    """The noise schedule of training and sampling: alphas_cumprod (abar_t, float64), VideoCrafter2's by default (the
    CPU demo shifts it: demo/unet.py), the float32 coefficients of z_t and v, and `scale`, VideoCrafter2's input rescaling
    s_t (input_scale) with rescale, else None (s_t = 1: the arithmetic of a schedule without it)."""

    def __init__(self, alphas_cumprod=None, device="cpu", rescale=False):
        self.alphas_cumprod = linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        self.num_steps = len(self.alphas_cumprod)
        self.sqrt_abar = self.alphas_cumprod.sqrt().float().to(device)
        self.sqrt_one_minus_abar = (1 - self.alphas_cumprod).sqrt().float().to(device)
        self.scale = input_scale(self.num_steps).to(device) if rescale else None

    def coefficients(self, t):
        """(B,) timesteps -> sqrt(abar_t), sqrt(1 - abar_t), each (B, 1, 1, 1, 1)."""
        shape = (-1, 1, 1, 1, 1)
        if self.sqrt_abar.device != t.device:  # moved once to where the timesteps are, not copied at every call
            self.sqrt_abar, self.sqrt_one_minus_abar = self.sqrt_abar.to(t.device), self.sqrt_one_minus_abar.to(t.device)
        return self.sqrt_abar[t].view(shape), self.sqrt_one_minus_abar[t].view(shape)

    def rescaled(self, z0, t):
        """z0 (B, C, T, h, w) -> s_t z0, what both noising and the v-target see (DynamiCrafter's LatentDiffusion.forward
        rescales before q_sample and get_v alike); z0 itself without rescaling."""
        if self.scale is None:
            return z0
        if self.scale.device != t.device:
            self.scale = self.scale.to(t.device)
        return z0 * self.scale[t].view(-1, 1, 1, 1, 1)  # (B, C, T, h, w)


def q_sample(schedule, z0, t, noise):
    """Forward noising: z_t = sqrt(abar_t) s_t z0 + sqrt(1 - abar_t) eps (s_t = 1 without rescaling)."""
    a, s = schedule.coefficients(t)
    return a * schedule.rescaled(z0, t) + s * noise  # (B, C, T, h, w)


def v_target(schedule, z0, t, noise):
    """The v-prediction target of the rescaled clip: v = sqrt(abar_t) eps - sqrt(1 - abar_t) s_t z0."""
    a, s = schedule.coefficients(t)
    return a * noise - s * schedule.rescaled(z0, t)  # (B, C, T, h, w)


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
