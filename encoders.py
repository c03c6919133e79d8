"""The text encoders and autoencoders around the U-Net: captions -> context, video <-> latents.

    text:  BytesTextEncoder (the demo's, UTF-8 bytes through a small transformer, trained with the U-Net)
           OpenCLIPTextEncoder (VideoCrafter2's, frozen: OpenCLIP ViT-H-14's penultimate layer)
    video: PixelAutoencoder (no weights: space-to-depth) and KLAutoencoder (Stable Diffusion's kl-f8, frozen)

model.MotifModel builds one of each from its config. Parameter names are lvdm's and open_clip's, so VideoCrafter2's
`first_stage_model.*` and `cond_stage_model.model.*` load with no key map (checkpoint.py).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- text encoder

class BytesTextEncoder(nn.Module):
    """Demo-scale text encoder trained with the U-Net: UTF-8 bytes -> a small transformer -> (B, L, D).
    The empty prompt (classifier-free guidance's null text) is all padding tokens."""

    PAD = 256

    def __init__(self, dim, max_len=64, layers=2, heads=4):
        super().__init__()
        self.max_len = max_len
        self.width = dim
        self.token = nn.Embedding(257, dim)
        self.position = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def length(self, caption):
        """Tokens the caption needs (its UTF-8 bytes); more than max_len are cut."""
        return len(caption.encode("utf-8"))

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


def import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise ImportError("the openclip text encoder needs the open_clip_torch package: "
                          "pip install open_clip_torch") from None
    return open_clip


class OpenCLIPTextEncoder(nn.Module):
    """VideoCrafter2's text encoder (FrozenOpenCLIPEmbedder, layer "penultimate"), frozen: captions ->
    OpenCLIP tokens (B, 77) -> token + position embedding -> every transformer block but the last -> ln_final
    -> (B, 77, width). `model` is open_clip's own text tower (the vision tower is never built), so the
    names are those of VideoCrafter2's `cond_stage_model.model.*` and its checkpoint loads with no key map.
    The empty prompt is "" tokenised as any other: start token, end token, then zeros."""

    def __init__(self, name="ViT-H-14"):
        super().__init__()
        open_clip = import_open_clip()
        clip_cfg = open_clip.get_model_config(name)
        if clip_cfg is None:
            raise ValueError(f"open_clip has no model config {name!r} (try ViT-H-14)")
        # the builder open_clip's CLIP uses for its text half: token_embedding, positional_embedding,
        # transformer.resblocks.*, ln_final, text_projection; batch-first blocks, causal attention mask
        self.model = open_clip.model._build_text_tower(clip_cfg["embed_dim"], clip_cfg["text_cfg"],
                                                       quick_gelu=clip_cfg.get("quick_gelu", False))
        # CLIP's temperature: unused here, kept because the checkpoint has it (cond_stage_model.model.logit_scale)
        self.model.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.name = name
        self.max_len = self.model.context_length  # tokens, start and end included
        self.width = self.model.width
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # frozen: always in eval mode

    def length(self, caption):
        """Tokens the caption needs, start and end tokens included; more than max_len are cut."""
        return len(import_open_clip().get_tokenizer(self.name).encode(caption)) + 2

    def tokenize(self, captions):
        return import_open_clip().tokenize(captions, context_length=self.max_len)  # (B, L), cut to fit

    def forward(self, captions):
        tokens = self.tokenize(captions).to(self.model.positional_embedding.device)
        x = self.model.token_embedding(tokens) + self.model.positional_embedding  # (B, L, D)
        for block in self.model.transformer.resblocks[:-1]:  # the penultimate layer's output
            x = block(x, attn_mask=self.model.attn_mask)
        return self.model.ln_final(x)  # (B, L, D)


# ----------------------------------------------------------------------------- autoencoders

def framewise(fn, video, chunk):
    """Apply fn to the frames of video (B, C, T, H, W), `chunk` frames at a time -> (B, C', T, H', W')."""
    b, c, t, h, w = video.shape
    frames = video.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)
    out = torch.cat([fn(part) for part in frames.split(chunk)])  # (B*T, C', H', W')
    return out.view(b, t, *out.shape[1:]).transpose(1, 2)  # (B, C', T, H', W')


class PixelAutoencoder(nn.Module):
    """No weights: frames as they are, folded space-to-depth by `patch` (3 -> 3*patch^2 channels)."""

    def __init__(self, patch=2):
        super().__init__()
        self.patch = patch
        self.latent_channels = 3 * patch * patch
        self.factor = patch

    def encode(self, video, noise=None):  # (B, 3, T, H, W) in [-1, 1]
        """Deterministic: `noise` has no posterior to sample (it is here for the interface the KL autoencoder shares)."""
        b, c, t, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)
        z = F.pixel_unshuffle(frames, self.patch)  # (B*T, 3p^2, H/p, W/p)
        return z.view(b, t, *z.shape[1:]).transpose(1, 2)  # (B, 3p^2, T, H/p, W/p)

    def decode(self, z):  # (B, 3p^2, T, h, w)
        b, c, t, h, w = z.shape
        frames = F.pixel_shuffle(z.transpose(1, 2).reshape(b * t, c, h, w), self.patch)  # (B*T, 3, H, W)
        return frames.view(b, t, *frames.shape[1:]).transpose(1, 2)  # (B, 3, T, H, W)


@dataclass(frozen=True)
class KLConfig:
    ch: int = 128  # width of the first level
    ch_mult: tuple = (1, 2, 4, 4)  # widths of the levels; each level but the last halves the frame
    num_res_blocks: int = 2  # per level in the encoder (the decoder has one more)
    latent_channels: int = 4


KL_SIZES = {
    # the sizes of VideoCrafter's reference vectors (parity tests): tests/fixtures/vae_kl_small.pt (2x smaller, not 8x)
    # and ../shared/reference/vae_kl_f8_tiny.pt
    "small": KLConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
    "tiny": KLConfig(ch=32, num_res_blocks=1),
    # Stable Diffusion's / VideoCrafter2's autoencoder (83.7 M parameters)
    "full": KLConfig(),
}


def group_norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class VAEResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 conv on the skip when the width changes. No time embedding."""

    def __init__(self, channels, out_channels):
        super().__init__()
        self.norm1 = group_norm(channels)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x):  # (N, C, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h  # (N, C', H, W)


class VAEAttention(nn.Module):
    """One-head self-attention over the pixels of each frame, 1x1 conv projections, residual."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):  # (N, C, H, W)
        n, c, h, w = x.shape
        x_norm = self.norm(x)
        q, k, v = (proj(x_norm).flatten(2).transpose(1, 2)[:, None]  # (N, 1, HW, C): one head
                   for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (N, 1, HW, C)
        return x + self.proj_out(out[:, 0].transpose(1, 2).reshape(n, c, h, w))


class VAEDownsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only (the checkpoint's convention)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv: the kl-f8 decoder's and the U-Net's (model.py), with lvdm's names in both."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class VAELevel(nn.Module):
    """One resolution: ResBlocks, then the encoder's `downsample` or the decoder's `upsample`, or neither."""

    def __init__(self, channels, out_channels, num_blocks, resample=None):
        super().__init__()
        self.block = nn.ModuleList([VAEResBlock(channels if i == 0 else out_channels, out_channels)
                                    for i in range(num_blocks)])
        self.resample = resample
        if resample == "downsample":
            self.downsample = VAEDownsample(out_channels)
        elif resample == "upsample":
            self.upsample = Upsample(out_channels)  # nearest x2, 3x3 conv: the U-Net's, with the same names

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return getattr(self, self.resample)(x) if self.resample else x


class VAEMiddle(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.block_1 = VAEResBlock(channels, channels)
        self.attn_1 = VAEAttention(channels)
        self.block_2 = VAEResBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class VAEEncoder(nn.Module):
    """frames (N, 3, H, W) -> (N, 2 * latent_channels, H/f, W/f): the posterior's moments before quant_conv."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList([VAELevel(c_in, c_out, cfg.num_res_blocks, "downsample" if i < last else None)
                                   for i, (c_in, c_out) in enumerate(zip([cfg.ch] + widths[:-1], widths))])
        self.mid = VAEMiddle(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class VAEDecoder(nn.Module):
    """latents (N, latent_channels, h, w) -> frames (N, 3, h*f, w*f). `up` is indexed by level, run deepest first."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)
        self.mid = VAEMiddle(widths[-1])
        # level i starts from the width of level i+1 (the deepest from its own)
        self.up = nn.ModuleList([VAELevel(c_in, c_out, cfg.num_res_blocks + 1, "upsample" if i > 0 else None)
                                 for i, (c_in, c_out) in enumerate(zip(widths[1:] + widths[-1:], widths))])
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class KLAutoencoder(nn.Module):
    """Stable Diffusion's KL-regularised autoencoder as VideoCrafter2 uses it, frozen: each frame on its own,
    8x smaller, 4 channels, latents scaled by 0.18215 (about unit variance). The names are lvdm's
    (`encoder.down.0.block.0.conv1.weight`), so a checkpoint's `first_stage_model.*` loads with no key map.
    Frames go through `frames_per_chunk` at a time, so a long or large clip needs bounded memory."""

    scale_factor = 0.18215

    def __init__(self, cfg: KLConfig, frames_per_chunk=8):
        super().__init__()
        c = cfg.latent_channels
        self.encoder = VAEEncoder(cfg)
        self.decoder = VAEDecoder(cfg)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)
        self.post_quant_conv = nn.Conv2d(c, c, 1)
        self.latent_channels = c
        self.factor = 2 ** (len(cfg.ch_mult) - 1)
        self.frames_per_chunk = frames_per_chunk
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # frozen: always in eval mode

    def encode(self, video, noise=None):
        """video (B, 3, T, H, W) in [-1, 1] -> (B, 4, T, H/8, W/8) x 0.18215: the posterior's mean, or, given noise
        (B, 4, T, H/8, W/8) of N(0, 1) draws, the posterior sample mean + std * noise, which VideoCrafter2 and
        DynamiCrafter train on (their get_first_stage_encoding samples DiagonalGaussianDistribution)."""
        moments = framewise(lambda frames: self.quant_conv(self.encoder(frames)), video.to(self.quant_conv.weight.dtype),
                            self.frames_per_chunk)  # (B, 8, T, h, w)
        mean, logvar = moments.chunk(2, dim=1)  # (B, 4, T, h, w) each
        if noise is not None:
            mean = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise.to(mean)
        return mean * self.scale_factor

    def decode(self, z):
        """(B, 4, T, h, w) -> video (B, 3, T, 8h, 8w), about [-1, 1] (not clamped)."""
        def decode_frames(latents):
            return self.decoder(self.post_quant_conv(latents / self.scale_factor))
        return framewise(decode_frames, z.to(self.post_quant_conv.weight.dtype), self.frames_per_chunk)
