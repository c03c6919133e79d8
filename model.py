"""The networks: VideoCrafter2's 3D U-Net with x-cat input, the text encoders, the autoencoders.

Data flow (DESIGN.md): video -> autoencoder.encode -> z0 (B, C, T, h, w); the first frame's
latent is repeated over T and concatenated on channels with the noisy latent z_t (x-cat);
prompt -> text encoder -> context (B, L, D); UNet(cat[z_t, z_img], t, context, fps) -> v.

The U-Net follows VideoCrafter2 (lvdm/modules/networks/openaimodel3d.py) module for module, and
its attribute names are that code's parameter names (`input_blocks.1.0.in_layers.2.weight`, even
the upstream spelling `temopral_conv`), so a VideoCrafter2 checkpoint and the reference vectors
in tests/fixtures load with no key map. The same holds for the full recipe's frozen parts: the
KL-f8 autoencoder (lvdm's `first_stage_model.*` names) and the OpenCLIP ViT-H-14 text tower
(`cond_stage_model.model.*`); checkpoint.py loads all three from VideoCrafter2's model.ckpt.
Attention goes through PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels on GPU).
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from loss import Schedule


# ----------------------------------------------------------------------------- sizes

@dataclass(frozen=True)
class UNetConfig:
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)  # levels with spatial + temporal transformers
    head_channels: int = 64
    heads: int = 0  # a fixed number of heads per attention layer (VideoCrafter's num_heads); 0: channels // head_channels
    context_dim: int = 1024
    in_channels: int = 8  # noisy latent + image latent (x-cat)
    out_channels: int = 4
    init_attn_heads: int = 8  # the temporal attention after the first conv (VideoCrafter2: 8 x head_channels)
    temporal_dropout: float = 0.1  # dropout inside the temporal conv blocks (VideoCrafter2: 0.1)
    gradient_checkpointing: bool = False
    # ways for the condition to reach the features beyond cross-attention (all off in VideoCrafter2):
    scale_shift_norm: bool = False  # ResBlocks: GroupNorm(h) * (1 + scale) + shift from the embedding (ADM; VideoCrafter's use_scale_shift_norm)
    pooled_text: bool = False  # the mean text token, through an MLP (last layer zero-init), added to the embedding
    frame_embedding: bool = False  # the frame index, sinusoidal then an MLP (last layer zero-init), added per frame


SIZES = {
    # the size of ../shared/reference/unet_vc2_tiny.pt (parity test)
    "tiny": UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), head_channels=16, context_dim=64),
    # the CPU demo on 32x32 shapes videos with the pixel autoencoder at patch 2 (16x16x12 latents)
    "demo": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                       head_channels=32, context_dim=64, init_attn_heads=1),
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

def attention(q, k, v):
    """scaled_dot_product_attention of (N, heads, L, d) tensors. On CPU, heads narrower than 16 attending from 64+
    queries are zero-padded to 16 (the zeros change no score, and the padded outputs are dropped): PyTorch's CPU
    flash-attention kernel ran 1.2-1.8x faster that way (torch 2.14, AVX-512), and slower for shorter queries."""
    d = q.shape[-1]
    if q.device.type == "cpu" and d < 16 and q.shape[-2] >= 64:
        q, k, v = (F.pad(a, (0, 16 - d)) for a in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)[..., :d]
    return F.scaled_dot_product_attention(q, k, v)


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
        out = attention(q, k, v)  # (., heads, Lq, d)
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
        self.out_layers = nn.Sequential(nn.GroupNorm(32, out_channels), nn.SiLU(), nn.Identity(),
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
        if cfg.pooled_text:
            self.text_embedding = nn.Sequential(nn.Linear(cfg.context_dim, emb_dim), nn.SiLU(),
                                                zero(nn.Linear(emb_dim, emb_dim)))
        if cfg.frame_embedding:
            self.frame_embedding = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), zero(nn.Linear(emb_dim, emb_dim)))

        def resblock(channels, out_channels):
            return ResBlock(channels, emb_dim, out_channels, cfg.temporal_dropout, cfg.scale_shift_norm)

        def transformers(channels):
            heads = cfg.heads or channels // cfg.head_channels
            head_dim = channels // cfg.heads if cfg.heads else cfg.head_channels
            return [SpatialTransformer(channels, heads, head_dim, cfg.context_dim),
                    TemporalTransformer(channels, heads, head_dim)]

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

    def run(self, stage, h, emb, context, batch_size):
        if self.cfg.gradient_checkpointing and self.training:
            return checkpoint(stage, h, emb, context, batch_size, use_reentrant=False)
        return stage(h, emb, context, batch_size)

    def forward(self, x, t, context, fps):
        """x (B, C_in, T, H, W), t (B,), context (B, L, D), fps (B,) -> (B, C_out, T, H, W)."""
        b, _, frames, height, width = x.shape
        ch = self.cfg.model_channels
        emb = self.time_embed(timestep_embedding(t, ch)) + self.fps_embedding(timestep_embedding(fps, ch))  # (B, E)
        if self.cfg.pooled_text:
            emb = emb + self.text_embedding(context.mean(dim=1))  # (B, E)
        emb = emb.repeat_interleave(frames, dim=0)  # (B*T, E)
        if self.cfg.frame_embedding:
            index = torch.arange(frames, device=x.device).repeat(b)  # (B*T,): 0..T-1 for each sample
            emb = emb + self.frame_embedding(timestep_embedding(index, ch))  # (B*T, E)
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

    def encode(self, video, sample=False, generator=None):  # (B, 3, T, H, W) in [-1, 1]
        """Deterministic: `sample` has nothing to draw (it is here for the interface the KL autoencoder shares)."""
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

    def encode(self, video, sample=False, generator=None):
        """video (B, 3, T, H, W) in [-1, 1] -> (B, 4, T, H/8, W/8): the posterior mean (or, with sample, a draw
        from the posterior, noise from `generator`) x 0.18215."""
        def encode_frames(frames):
            mean, logvar = self.quant_conv(self.encoder(frames)).chunk(2, dim=1)  # (N, 4, h, w) each
            if sample:
                noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
                mean = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise
            return mean * self.scale_factor
        return framewise(encode_frames, video.to(self.quant_conv.weight.dtype), self.frames_per_chunk)

    def decode(self, z):
        """(B, 4, T, h, w) -> video (B, 3, T, 8h, 8w), about [-1, 1] (not clamped)."""
        def decode_frames(latents):
            return self.decoder(self.post_quant_conv(latents / self.scale_factor))
        return framewise(decode_frames, z.to(self.post_quant_conv.weight.dtype), self.frames_per_chunk)


# ----------------------------------------------------------------------------- the TI2V model

@dataclass
class ModelConfig:
    size: str = "demo"  # a key of SIZES
    text_encoder: str = "bytes"  # "bytes" (small, trained with the U-Net) or "openclip" (frozen, VideoCrafter2's)
    autoencoder: str = "pixel"  # "pixel" (no weights) or "kl-f8" (frozen, VideoCrafter2's)
    pixel_patch: int = 2
    kl_size: str = "full"  # a key of KL_SIZES
    openclip_model: str = "ViT-H-14"  # an open_clip model config; only its text tower is built
    max_text_len: int = 64  # of the bytes text encoder
    temporal_dropout: float = 0.1
    gradient_checkpointing: bool = False
    noise_shift: float = 1.0  # the noise schedule's (loss.Schedule): signal-to-noise ratio / noise_shift^2 at every t
    zero_terminal_snr: bool = False  # the noise schedule's: t = 999 is pure noise

    @classmethod
    def from_run_config(cls, config: dict) -> "ModelConfig":
        """The model a train.py config describes (a plain dict, as checkpoints store it): its `model` key names the
        size; its keys named like this class's fields are taken as they are, the rest are not the model's."""
        fields = {name: config[name] for name in cls.__dataclass_fields__ if name != "size" and name in config}
        return cls(size=config["model"], **fields)


class MotifModel(nn.Module):
    """Autoencoder + text encoder + x-cat U-Net. Trainable: the U-Net and the bytes text encoder; the KL
    autoencoder and the OpenCLIP text encoder are frozen. The U-Net's context_dim is the text encoder's width."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.size not in SIZES:
            raise ValueError(f"unknown model size {cfg.size!r}; choose one of {sorted(SIZES)}")
        if cfg.autoencoder not in ("pixel", "kl-f8") or cfg.text_encoder not in ("bytes", "openclip"):
            raise ValueError(f"unknown autoencoder/text encoder {cfg.autoencoder!r}/{cfg.text_encoder!r}; "
                             "autoencoders: pixel, kl-f8; text encoders: bytes, openclip")
        if cfg.autoencoder == "kl-f8" and cfg.kl_size not in KL_SIZES:
            raise ValueError(f"unknown kl-f8 size {cfg.kl_size!r}; choose one of {sorted(KL_SIZES)}")
        self.cfg = cfg
        unet_cfg = SIZES[cfg.size]
        if cfg.autoencoder == "pixel":
            self.autoencoder = PixelAutoencoder(cfg.pixel_patch)
        else:
            self.autoencoder = KLAutoencoder(KL_SIZES[cfg.kl_size])
        if cfg.text_encoder == "bytes":
            self.text_encoder = BytesTextEncoder(unet_cfg.context_dim, cfg.max_text_len)
        else:
            self.text_encoder = OpenCLIPTextEncoder(cfg.openclip_model)
        self.schedule = Schedule(shift=cfg.noise_shift, zero_terminal_snr=cfg.zero_terminal_snr)  # for training and sampling
        c = self.autoencoder.latent_channels
        self.unet = UNet(replace(unet_cfg, context_dim=self.text_encoder.width, in_channels=2 * c, out_channels=c,
                                 temporal_dropout=cfg.temporal_dropout,
                                 gradient_checkpointing=cfg.gradient_checkpointing))

    @property
    def resolution_factor(self):
        """Frame sides must be multiples of this: the autoencoder's factor times the U-Net's downsamplings."""
        return self.autoencoder.factor * 2 ** (len(self.unet.cfg.channel_mult) - 1)

    def encode_video(self, video, sample=False, generator=None):
        """video (B, 3, T, H, W) in [-1, 1] -> z0 (B, C, T, h, w); `sample`: a posterior draw (kl-f8), not its mean."""
        return self.autoencoder.encode(video, sample, generator)  # (B, C, T, h, w)

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
