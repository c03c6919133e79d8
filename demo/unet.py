"""Not MotiF: what makes a 3 M-parameter U-Net read its prompt at 32x32, for the CPU demo (`--preset shapes`).

Where it sits: model.py builds this file's U-Net for the `demo` size instead of VideoCrafter2's (model.py), which it
subclasses, and shifts the noise schedule, and train.py draws the timesteps, as config/shapes.toml asks; nothing on
the recipe's path uses them. At the demo's size, cross-attention alone let the text in too weakly for a model
trained for minutes to learn which way the prompt says the shape moves (docs/demo-study.md has the measurements
that chose each piece). Three additions to the U-Net, each starting at zero so that the network begins as the
plain U-Net:
- the pooled text: the text tokens, attention-pooled by POOL_QUERIES learned queries, through an MLP, added to the
  embedding every ResBlock reads (with the config's scale_shift_norm, VideoCrafter's ADM option, the embedding
  scales the normalised features as well as shifting them);
- the frame embedding: the frame index (sinusoidal) with the pooled text, through an MLP, added per frame: which
  way the text says, at which frame;
- the input skip: for t below input_skip_below, v_hat += a * z_t + b * z_img per channel and frame, a and b from the
  embedding (detached): a blend of z_t and the image is all the v of a pixel that stays as in frame 0.
And two changes to what it trains on: the noise schedule shifted so that z_t hides where a shape went at high t
(demo_alphas_cumprod), and more of the timesteps drawn there (high_t_floor).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from model import UNet, UNetConfig, timestep_embedding, zero

POOL_QUERIES = 4  # learned queries that pool the text


# ----------------------------------------------------------------------------- what the demo trains on

def high_t_floor(generator, share, num_timesteps):
    """The lowest timestep of a sample's draw: the top tenth of the range for `share` of the samples, where the
    motion is decided and z_t holds little of the clip (config/shapes.toml's high_t_share = 0.3), else 0."""
    return num_timesteps * 9 // 10 if torch.rand(1, generator=generator).item() < share else 0


# ----------------------------------------------------------------------------- the demo's U-Net


@dataclass(frozen=True)
class DemoUNetConfig(UNetConfig):
    input_skip_below: int = 400  # the input skip acts for t below this

    def unet_class(self):
        return DemoUNet


# the CPU demo's size, on 32x32 shapes videos with the pixel autoencoder at patch 2 (16x16x12 latents)
DEMO = DemoUNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                      head_channels=32, context_dim=64, init_attn_heads=1, scale_shift_norm=True, input_skip_below=400)


class DemoUNet(UNet):
    def add_embeddings(self, emb_dim):
        """The pooled text's and the frame's embeddings (called by UNet.__init__ where VideoCrafter2 has none)."""
        ch, context_dim = self.cfg.model_channels, self.cfg.context_dim
        pooled_dim = POOL_QUERIES * context_dim
        self.text_pool = nn.Parameter(torch.randn(POOL_QUERIES, context_dim) * context_dim ** -0.5)
        self.text_embedding = nn.Sequential(nn.Linear(pooled_dim, emb_dim), nn.SiLU(), zero(nn.Linear(emb_dim, emb_dim)))
        self.frame_embedding = nn.Sequential(nn.Linear(ch + pooled_dim, emb_dim), nn.SiLU(),
                                             zero(nn.Linear(emb_dim, emb_dim)))

    def __init__(self, cfg: DemoUNetConfig):
        super().__init__(cfg)
        emb_dim = 4 * cfg.model_channels  # the embedding's width, as in UNet
        self.input_skip = nn.Sequential(nn.SiLU(), zero(nn.Linear(emb_dim, 2 * cfg.out_channels)))

    def embed(self, t, fps, context, frames):
        """UNet's embedding + the pooled text's, then + the frame's (frame index and pooled text): (B*T, E)."""
        ch, b = self.cfg.model_channels, len(t)
        emb = self.time_embed(timestep_embedding(t, ch)) + self.fps_embedding(timestep_embedding(fps, ch))  # (B, E)
        weights = torch.softmax(context @ self.text_pool.T.to(context.dtype), dim=1)  # (B, L, Q): each query's pick of tokens
        pooled = torch.einsum("blq,bld->bqd", weights, context).flatten(1)  # (B, Q*D)
        emb = (emb + self.text_embedding(pooled)).repeat_interleave(frames, dim=0)  # (B*T, E)
        index = torch.arange(frames, device=t.device).repeat(b)  # (B*T,): 0..T-1 for each sample
        frame = torch.cat([timestep_embedding(index, ch).to(emb.dtype), pooled.repeat_interleave(frames, dim=0)], dim=1)
        return emb + self.frame_embedding(frame)  # (B*T, E)

    def forward(self, x, t, context, fps):
        """x (B, C_in, T, H, W) = cat[z_t, z_img], t (B,), context (B, L, D), fps (B,) -> (B, C_out, T, H, W)."""
        b, _, frames = x.shape[:3]
        emb = self.embed(t, fps, context, frames)  # (B*T, E)
        v_hat = self.body(x, emb, context)  # (B, C_out, T, H, W)
        # emb detached: the skip reads the embedding and does not train it (with its gradient, a sum over every pixel,
        # flowing into the embedding, the text path learned the direction word less: docs/demo-study.md)
        weights = self.input_skip(emb.detach()).view(b, frames, -1).transpose(1, 2)[..., None, None]  # (B, 2C, T, 1, 1)
        weight_t, weight_img = weights.chunk(2, dim=1)  # (B, C_out, T, 1, 1) each
        low_t = (t < self.cfg.input_skip_below).to(v_hat.dtype)[:, None, None, None, None]  # (B, 1, 1, 1, 1)
        z_t, z_img = x.chunk(2, dim=1)  # (B, C_out, T, H, W) each
        return v_hat + low_t * (weight_t * z_t + weight_img * z_img)
