"""VideoCrafter2's 3-D U-Net, with x-cat input: what MotiF fine-tunes.

Where it sits: model.py puts it between a text encoder and an autoencoder (encoders.py) and calls it as
UNet(cat[z_t, z_img], t, context, fps) -> v_hat (B, C, T, h, w) (MotifModel.denoise), in training and sampling. The noisy latent z_t and
the image latent z_img (the first frame's latent repeated over T) are concatenated on channels: x-cat, the one change
MotiF makes to VideoCrafter2's network (the 4 new input channels of the first conv start at zero: checkpoint.py).

It follows VideoCrafter2 (lvdm/modules/networks/openaimodel3d.py) module for module, and its attribute names are
that code's parameter names (`input_blocks.1.0.in_layers.2.weight`, even the upstream spelling `temopral_conv`), so
a VideoCrafter2 checkpoint and the reference vectors in tests/fixtures load with no key map. Attention goes through
PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels on GPU). Nothing here is the CPU demo's:
its extra conditioning is demo.py's, a subclass.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from encoders import Upsample


@dataclass(frozen=True)
class UNetConfig:
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)  # levels with spatial + temporal transformers
    head_channels: int = 64
    context_dim: int = 1024
    in_channels: int = 8  # noisy latent + image latent (x-cat)
    out_channels: int = 4
    init_attn_heads: int = 8  # the temporal attention after the first conv (VideoCrafter2: 8 x head_channels)
    temporal_dropout: float = 0.1  # dropout inside the temporal conv blocks (VideoCrafter2: 0.1)
    gradient_checkpointing: bool = False
    scale_shift_norm: bool = False  # VideoCrafter's use_scale_shift_norm (off in VideoCrafter2): ResBlocks take GroupNorm(h) * (1 + scale) + shift from the embedding


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (B,) timesteps (or fps values) -> (B, dim): [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)



# ----------------------------------------------------------------------------- attention



MAX_ATTENTION_BATCH = 65535  # the fused CUDA attention kernels put the batch on a grid axis capped here (PyTorch
# issue 146704): temporal attention's batch is B x h x w (66,560 for 26 clips of vc2 at 320 x 512), so it goes in parts


class Attention(nn.Module):
    """Multi-head attention; self-attention when context is None."""

    def __init__(self, dim, heads, head_dim, context_dim=None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))

    def forward(self, x, context=None):
        """x (N, L, dim) -> (N, L, dim). context: None (self-attention) or (B, L_text, context_dim) with N a multiple
        of B: the N / B consecutive rows of x (the frames of a sample) attend to the same text."""
        n, length, dim = x.shape
        if context is None:
            context = x
        else:  # the queries of all frames of a sample together: its text's keys and values computed once, not per frame
            x = x.reshape(context.shape[0], -1, dim)  # (B, T*L, dim)
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (., L, heads*d)
        q, k, v = (a.unflatten(-1, (self.heads, -1)).transpose(1, 2) for a in (q, k, v))  # (., heads, L, d)
        out = torch.cat([F.scaled_dot_product_attention(*(a[i:i + MAX_ATTENTION_BATCH] for a in (q, k, v)))
                         for i in range(0, len(q), MAX_ATTENTION_BATCH)])  # (., heads, Lq, d)
        return self.to_out(out.transpose(1, 2).reshape(n, length, -1))  # (N, L, dim)


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        # two matmuls on the halves of proj rather than one split in two: contiguous halves, no gradient copy
        # (the feed-forward layer's forward + backward 1.03-1.17x faster at the bench size on CPU)
        inner = self.proj.out_features // 2
        w, b = self.proj.weight, self.proj.bias
        return F.linear(x, w[:inner], b[:inner]) * F.gelu(F.linear(x, w[inner:], b[inner:]))


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        # nn.Identity where upstream has its (unused) Dropout: the checkpoint's keys keep their indices (net.2)
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """attn1 (self) -> attn2 (cross to text, or self when context_dim is None) -> GEGLU FF, pre-norm."""

    def __init__(self, dim, heads, head_dim, context_dim=None):
        super().__init__()
        self.attn1 = Attention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


def project(layer, x):
    """Apply a token projection stored as nn.Linear or as a 1x1 nn.Conv1d (VideoCrafter2's init_attn)."""
    weight = layer.weight.flatten(1) if isinstance(layer, nn.Conv1d) else layer.weight
    return F.linear(x, weight, layer.bias)


class SpatialTransformer(nn.Module):
    """Attention over the pixels of each frame, with cross-attention to the text. Zero-init output."""

    def __init__(self, channels, heads, head_dim, context_dim):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim, context_dim)])
        self.proj_out = zero(nn.Linear(inner, channels))

    def forward(self, x, context, batch_size):
        bt, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B*T, H*W, C)
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = self.proj_out(tokens)  # (B*T, H*W, C)
        return x + tokens.transpose(1, 2).reshape(bt, c, h, w)


class TemporalTransformer(nn.Module):
    """Attention over the frames at each pixel, self-attention only (both attn1 and attn2). Zero-init output."""

    def __init__(self, channels, heads, head_dim, conv_projections=False):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        proj = (lambda i, o: nn.Conv1d(i, o, 1)) if conv_projections else nn.Linear
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim)])
        self.proj_out = zero(proj(inner, channels))

    def forward(self, x, context, batch_size):
        bt, c, h, w = x.shape
        t = bt // batch_size
        video = x.view(batch_size, t, c, h, w).transpose(1, 2)  # (B, C, T, H, W)
        tokens = self.norm(video).permute(0, 3, 4, 2, 1).reshape(-1, t, c)  # (B*H*W, T, C)
        tokens = project(self.proj_in, tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens)
        tokens = project(self.proj_out, tokens)  # (B*H*W, T, C)
        tokens = tokens.view(batch_size, h, w, t, c).permute(0, 3, 4, 1, 2).reshape(bt, c, h, w)
        return x + tokens


# ----------------------------------------------------------------------------- convolution blocks

class TemporalConv(nn.Conv3d):
    """A Conv3d with a (k, 1, 1) kernel (stride 1) computed as a (k, 1) Conv2d over (B, C, T, H*W): the same parameters
    and result; PyTorch's CPU Conv3d takes a slow im2col path (1.3-2.6x slower forward + backward at the bench size)."""

    def forward(self, x):  # (B, C, T, H, W)
        y = F.conv2d(x.flatten(3), self.weight.flatten(3), self.bias, padding=self.padding[:2])  # (B, C', T, H*W)
        return y.view(*y.shape[:3], *x.shape[3:])


class TemporalConvBlock(nn.Module):
    """4 x [GroupNorm-SiLU-(Dropout)-Conv3d k=(3,1,1)] over frames, last conv zero-init, residual."""

    def __init__(self, channels, dropout):
        super().__init__()

        def conv(drop):
            layers = [nn.GroupNorm(32, channels), nn.SiLU()] + ([nn.Dropout(dropout)] if drop else [])
            return nn.Sequential(*layers, TemporalConv(channels, channels, (3, 1, 1), padding=(1, 0, 0)))

        self.conv1, self.conv2, self.conv3, self.conv4 = conv(False), conv(True), conv(True), conv(True)
        zero(self.conv4[-1])

    def forward(self, x):  # (B, C, T, H, W)
        return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + embedding (or, with scale_shift, GroupNorm(h) * (1 + scale) + shift), GroupNorm-SiLU-conv
    (zero-init), skip; then the temporal conv block."""

    def __init__(self, channels, emb_channels, out_channels, temporal_dropout, scale_shift=False):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (1 + scale_shift) * out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, out_channels), nn.SiLU(), nn.Identity(),  # upstream's Dropout
                                        zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        self.temopral_conv = TemporalConvBlock(out_channels, temporal_dropout)  # upstream spelling, kept for checkpoints

    def forward(self, x, emb, batch_size):  # x (B*T, C, H, W), emb (B*T, E)
        h = self.in_layers(x)  # (B*T, C', H, W)
        emb = self.emb_layers(emb)[:, :, None, None]  # (B*T, C' or 2C', 1, 1)
        if self.scale_shift:  # the embedding multiplies the normalised features, as well as shifting them
            scale, shift = emb.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb)
        h = self.skip_connection(x) + h  # (B*T, C', H, W)
        bt, c, hh, ww = h.shape
        video = h.view(batch_size, bt // batch_size, c, hh, ww).transpose(1, 2)  # (B, C', T, H, W)
        return self.temopral_conv(video).transpose(1, 2).reshape(bt, c, hh, ww)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Stage(nn.ModuleList):
    """A sequence of layers that each get what they need: ResBlocks the embedding, transformers the text."""

    def forward(self, x, emb, context, batch_size):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, batch_size)
            elif isinstance(layer, (SpatialTransformer, TemporalTransformer)):
                x = layer(x, context, batch_size)
            else:
                x = layer(x)
        return x


def zero(module):
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# ----------------------------------------------------------------------------- the U-Net

class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.model_channels
        emb_dim = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.fps_embedding = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.add_embeddings(emb_dim)

        def resblock(channels, out_channels):
            return ResBlock(channels, emb_dim, out_channels, cfg.temporal_dropout, cfg.scale_shift_norm)

        def transformers(channels):
            heads = channels // cfg.head_channels
            return [SpatialTransformer(channels, heads, cfg.head_channels, cfg.context_dim),
                    TemporalTransformer(channels, heads, cfg.head_channels)]

        self.input_blocks = nn.ModuleList([Stage([nn.Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        # VideoCrafter2: init_attn_heads x head_channels (512 wide at 320 channels)
        self.init_attn = Stage([TemporalTransformer(ch, cfg.init_attn_heads, cfg.head_channels, conv_projections=True)])
        skip_channels = [ch]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [resblock(ch, mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if level in cfg.attention_levels:
                    layers += transformers(ch)
                self.input_blocks.append(Stage(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Stage([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = Stage([resblock(ch, ch), *transformers(ch), resblock(ch, ch)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if level in cfg.attention_levels:
                    layers += transformers(ch)
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Stage(layers))

        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), zero(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)))

    def add_embeddings(self, emb_dim):
        """None: VideoCrafter2's condition reaches the U-Net through the timestep and fps embeddings and
        cross-attention only. A hook for demo.py's U-Net, which adds two embeddings here, where they were first
        written, so that its parameters are drawn in the same order from the same seed."""

    def run(self, stage, h, emb, context, batch_size):
        if self.cfg.gradient_checkpointing and self.training:
            return checkpoint(stage, h, emb, context, batch_size, use_reentrant=False)
        return stage(h, emb, context, batch_size)

    def embed(self, t, fps, context, frames):
        """The embedding every ResBlock adds: t (B,), fps (B,) -> (B*T, E), one row per frame. VideoCrafter2's does
        not read the text (context); demo.py's U-Net, which overrides this, does."""
        ch = self.cfg.model_channels
        emb = self.time_embed(timestep_embedding(t, ch)) + self.fps_embedding(timestep_embedding(fps, ch))  # (B, E)
        return emb.repeat_interleave(frames, dim=0)  # (B*T, E)

    def body(self, x, emb, context):
        """x (B, C_in, T, H, W), the embedding (B*T, E), context (B, L, D) -> (B, C_out, T, H, W): the input blocks
        (their outputs kept as skips), the middle block, the output blocks (each with its skip), the output layer."""
        b, _, frames, height, width = x.shape
        h = x.transpose(1, 2).reshape(b * frames, -1, height, width)  # (B*T, C_in, H, W)
        skips = []
        for i, stage in enumerate(self.input_blocks):
            h = self.run(stage, h, emb, context, b)
            if i == 0:
                h = self.run(self.init_attn, h, emb, context, b)
            skips.append(h)
        h = self.run(self.middle_block, h, emb, context, b)
        for stage in self.output_blocks:
            h = self.run(stage, torch.cat([h, skips.pop()], dim=1), emb, context, b)
        y = self.out(h)  # (B*T, C_out, H, W)
        return y.view(b, frames, -1, height, width).transpose(1, 2)  # (B, C_out, T, H, W)

    def forward(self, x, t, context, fps):
        """x (B, C_in, T, H, W), t (B,), context (B, L, D), fps (B,) -> (B, C_out, T, H, W)."""
        return self.body(x, self.embed(t, fps, context, x.shape[2]), context)
