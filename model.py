"""The networks: VideoCrafter2's 3D U-Net with x-cat input, the text encoders, the autoencoders.

Data flow (see DESIGN.md): video -> autoencoder.encode -> z0 (B, C, T, h, w); the first frame's
latent is repeated over T and concatenated on channels with the noisy latent z_t (x-cat);
prompt -> text encoder -> context (B, L, D); UNet(cat[z_t, z_img], t, context, fps) -> v.

The U-Net follows VideoCrafter2 (lvdm/modules/networks/openaimodel3d.py) module for module, and
its attribute names are that code's parameter names (`input_blocks.1.0.in_layers.2.weight`, even
the upstream spelling `temopral_conv`), so a VideoCrafter2 checkpoint and the reference vectors
in shared/reference load with no key map. Attention goes through PyTorch's
scaled_dot_product_attention (flash / memory-efficient kernels on GPU).
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------- sizes

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
    init_attn_heads: int = 8  # the temporal attention after the first conv (VideoCrafter2: 8)
    temporal_dropout: float = 0.1  # dropout inside the temporal conv blocks (VideoCrafter2: 0.1)
    gradient_checkpointing: bool = False


SIZES = {
    # the size of shared/reference/unet_vc2_tiny.pt (parity test)
    "tiny": UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), head_channels=16, context_dim=64),
    # the CPU demo on 32x32 shapes videos
    "demo": UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                       head_channels=32, context_dim=128),
    # VideoCrafter2's U-Net (1.41 B parameters at 4 input channels)
    "vc2": UNetConfig(),
}


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (B,) timesteps (or fps values) -> (B, dim): [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


# ----------------------------------------------------------------------------- attention

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
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (N, L, heads*d)
        q, k, v = (a.unflatten(-1, (self.heads, -1)).transpose(1, 2) for a in (q, k, v))  # (N, heads, L, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, Lq, d)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (N, Lq, dim)


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
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

class TemporalConvBlock(nn.Module):
    """4 x [GroupNorm-SiLU-(Dropout)-Conv3d k=(3,1,1)] over frames, last conv zero-init, residual."""

    def __init__(self, channels, dropout):
        super().__init__()

        def conv(drop):
            layers = [nn.GroupNorm(32, channels), nn.SiLU()] + ([nn.Dropout(dropout)] if drop else [])
            return nn.Sequential(*layers, nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))

        self.conv1, self.conv2, self.conv3, self.conv4 = conv(False), conv(True), conv(True), conv(True)
        zero(self.conv4[-1])

    def forward(self, x):  # (B, C, T, H, W)
        return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + embedding, GroupNorm-SiLU-conv (zero-init), skip; then the temporal conv block."""

    def __init__(self, channels, emb_channels, out_channels, temporal_dropout):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, out_channels), nn.SiLU(), nn.Identity(),
                                        zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        self.temopral_conv = TemporalConvBlock(out_channels, temporal_dropout)  # upstream spelling, kept for checkpoints

    def forward(self, x, emb, batch_size):  # x (B*T, C, H, W), emb (B*T, E)
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        h = self.skip_connection(x) + self.out_layers(h)  # (B*T, C', H, W)
        bt, c, hh, ww = h.shape
        video = h.view(batch_size, bt // batch_size, c, hh, ww).transpose(1, 2)  # (B, C', T, H, W)
        return self.temopral_conv(video).transpose(1, 2).reshape(bt, c, hh, ww)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


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

        def transformers(channels):
            heads = channels // cfg.head_channels
            return [SpatialTransformer(channels, heads, cfg.head_channels, cfg.context_dim),
                    TemporalTransformer(channels, heads, cfg.head_channels)]

        self.input_blocks = nn.ModuleList([Stage([nn.Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        self.init_attn = Stage([TemporalTransformer(ch, cfg.init_attn_heads, cfg.head_channels, conv_projections=True)])
        skip_channels = [ch]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * cfg.model_channels, cfg.temporal_dropout)]
                ch = mult * cfg.model_channels
                if level in cfg.attention_levels:
                    layers += transformers(ch)
                self.input_blocks.append(Stage(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Stage([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = Stage([ResBlock(ch, emb_dim, ch, cfg.temporal_dropout), *transformers(ch),
                                   ResBlock(ch, emb_dim, ch, cfg.temporal_dropout)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * cfg.model_channels, cfg.temporal_dropout)]
                ch = mult * cfg.model_channels
                if level in cfg.attention_levels:
                    layers += transformers(ch)
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Stage(layers))

        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), zero(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)))

    def run(self, stage, h, emb, context, batch_size):
        if self.cfg.gradient_checkpointing and self.training:
            return checkpoint(stage, h, emb, context, batch_size, use_reentrant=False)
        return stage(h, emb, context, batch_size)

    def forward(self, x, t, context, fps):
        """x (B, C_in, T, H, W), t (B,), context (B, L, D), fps (B,) -> (B, C_out, T, H, W)."""
        b, _, frames, height, width = x.shape
        ch = self.cfg.model_channels
        emb = self.time_embed(timestep_embedding(t, ch)) + self.fps_embedding(timestep_embedding(fps, ch))  # (B, E)
        emb = emb.repeat_interleave(frames, dim=0)  # (B*T, E)
        context = context.repeat_interleave(frames, dim=0)  # (B*T, L, D)
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


def load_t2v_unet(unet: UNet, state_dict: dict) -> None:
    """Load a text-to-video U-Net (C input channels) into our x-cat U-Net (2C): the C image-latent
    input channels of the first conv start at zero, so the loaded model computes what it did before.
    Accepts VideoCrafter2's `model.diffusion_model.` prefix and `module.` / `_orig_mod.` wrappers."""
    prefix = "model.diffusion_model."
    if any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    state_dict = {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in state_dict.items()}
    key = "input_blocks.0.0.weight"
    if key not in state_dict:
        raise ValueError("not a VideoCrafter-style U-Net state dict (no input_blocks.0.0.weight)")
    ours = unet.input_blocks[0][0].weight
    theirs = state_dict[key]
    if theirs.shape[1] * 2 == ours.shape[1] and theirs.shape[0] == ours.shape[0]:
        state_dict[key] = torch.cat([theirs, torch.zeros_like(theirs)], dim=1)  # new image-latent channels = 0
    expected = unet.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"U-Net does not fit this model size: {len(missing)} missing keys (e.g. {missing[:2]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(wrong)} of another shape "
                         f"(e.g. {wrong[:2]})")
    unet.load_state_dict(state_dict)


# ----------------------------------------------------------------------------- text encoder

class BytesTextEncoder(nn.Module):
    """Demo-scale text encoder trained with the U-Net: UTF-8 bytes -> a small transformer -> (B, L, D).
    The empty prompt (classifier-free guidance's null text) is all padding tokens."""

    PAD = 256

    def __init__(self, dim, max_len=64, layers=2, heads=4):
        super().__init__()
        self.max_len = max_len
        self.token = nn.Embedding(257, dim)
        self.position = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, captions):
        tokens = torch.full((len(captions), self.max_len), self.PAD, dtype=torch.long)
        for i, caption in enumerate(captions):
            data = list(caption.encode("utf-8")[: self.max_len])
            tokens[i, : len(data)] = torch.tensor(data, dtype=torch.long)
        return tokens  # (B, L)

    def forward(self, captions):
        tokens = self.tokenize(captions).to(self.position.device)
        x = self.token(tokens) + self.position  # (B, L, D)
        return self.norm(self.encoder(x))  # (B, L, D)


# ----------------------------------------------------------------------------- autoencoder

class PixelAutoencoder(nn.Module):
    """No weights: frames as they are, folded space-to-depth by `patch` (3 -> 3*patch^2 channels)."""

    def __init__(self, patch=2):
        super().__init__()
        self.patch = patch
        self.latent_channels = 3 * patch * patch
        self.factor = patch

    def encode(self, video):  # (B, 3, T, H, W) in [-1, 1]
        b, c, t, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)
        z = F.pixel_unshuffle(frames, self.patch)  # (B*T, 3p^2, H/p, W/p)
        return z.view(b, t, *z.shape[1:]).transpose(1, 2)  # (B, 3p^2, T, H/p, W/p)

    def decode(self, z):  # (B, 3p^2, T, h, w)
        b, c, t, h, w = z.shape
        frames = F.pixel_shuffle(z.transpose(1, 2).reshape(b * t, c, h, w), self.patch)  # (B*T, 3, H, W)
        return frames.view(b, t, *frames.shape[1:]).transpose(1, 2)  # (B, 3, T, H, W)


# ----------------------------------------------------------------------------- the TI2V model

@dataclass
class ModelConfig:
    size: str = "demo"  # a key of SIZES
    text_encoder: str = "bytes"
    autoencoder: str = "pixel"
    pixel_patch: int = 2
    max_text_len: int = 64
    temporal_dropout: float = 0.1
    gradient_checkpointing: bool = False


class MotifModel(nn.Module):
    """Autoencoder + text encoder + x-cat U-Net. Trainable: the U-Net and the bytes text encoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.size not in SIZES:
            raise ValueError(f"unknown model size {cfg.size!r}; choose one of {sorted(SIZES)}")
        if cfg.autoencoder != "pixel" or cfg.text_encoder != "bytes":
            raise ValueError(f"unknown autoencoder/text encoder {cfg.autoencoder!r}/{cfg.text_encoder!r}; "
                             "this build has autoencoder 'pixel' and text encoder 'bytes'")
        self.cfg = cfg
        self.autoencoder = PixelAutoencoder(cfg.pixel_patch)
        unet_cfg = SIZES[cfg.size]
        self.text_encoder = BytesTextEncoder(unet_cfg.context_dim, cfg.max_text_len)
        c = self.autoencoder.latent_channels
        self.unet = UNet(replace(unet_cfg, in_channels=2 * c, out_channels=c, temporal_dropout=cfg.temporal_dropout,
                                 gradient_checkpointing=cfg.gradient_checkpointing))

    @property
    def resolution_factor(self):
        """Frame sides must be multiples of this: the autoencoder's factor times the U-Net's downsamplings."""
        return self.autoencoder.factor * 2 ** (len(self.unet.cfg.channel_mult) - 1)

    def encode_video(self, video):
        return self.autoencoder.encode(video)  # (B, C, T, h, w)

    @staticmethod
    def image_latent(z0):
        """x-cat conditioning: the latent of frame 0 repeated over all frames."""
        return z0[:, :, :1].expand_as(z0)  # (B, C, T, h, w)

    def denoise(self, z_t, z_img, t, context, fps):
        """v_hat from the noisy latent, the image latent (x-cat on channels) and the text context."""
        return self.unet(torch.cat([z_t, z_img], dim=1), t, context, fps)  # (B, C, T, h, w)

    def forward(self, z_t, z_img, t, captions, fps):
        """The training call: text encoding inside, so DDP sees every trainable parameter."""
        return self.denoise(z_t, z_img, t, self.text_encoder(captions), fps)  # (B, C, T, h, w)
