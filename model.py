"""The text-image-to-video model: MotifModel puts a U-Net between a text encoder and an autoencoder (model.py).

Data flow (DESIGN.md): video -> autoencoder.encode -> z0 (B, C, T, h, w); the first frame's latent is repeated over
T and concatenated on channels with the noisy latent z_t (x-cat); prompt -> text encoder -> context (B, L, D);
UNet(cat[z_t, z_img], t, context, fps) -> v_hat. The U-Net is VideoCrafter2's (model.py), or, for the CPU demo's
`demo` size, demo/unet.py's subclass with the extra conditioning a 3 M-parameter model needs at 32x32. model.py
loads the U-Net and the frozen encoders from VideoCrafter2's model.ckpt. The U-Net's FLOPs per training clip (for
MFU in train.py's log) are counted here, on the meta device.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from loss import Schedule, linear_alphas_cumprod, shift_snr, zero_terminal_snr

def training_flops(cfg: UNetConfig, frames, latent_size, context_len):
    """Model FLOPs of one clip's forward + backward through a U-Net of `cfg` (the MFU in train.py's log): a copy built
    on the meta device, without gradient checkpointing, where attention counts as its two matmuls."""
    with torch.device("meta"):
        unet = build_unet(replace(cfg, gradient_checkpointing=False)).train()
        x = torch.randn(1, cfg.in_channels, frames, *latent_size)  # (1, C_in, T, h, w)
        t, fps = torch.zeros(1, dtype=torch.long), torch.full((1,), 8.0)
        context = torch.randn(1, context_len, cfg.context_dim)  # (1, L, D)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, context, fps).square().mean().backward()
    return counter.get_total_flops()


def build_unet(cfg: UNetConfig) -> UNet:
    """The U-Net a config describes: VideoCrafter2's, or a subclass's for its config (the demo's)."""
    return cfg.unet_class()(cfg)


def resolve_rescale(rescale, init):
    """train.py's `rescale` (auto | true | false) -> whether z0 is rescaled: auto is on exactly when the U-Net starts
    from --init (VideoCrafter2's checkpoint learned the rescaling; a model from scratch has nothing to match). A run
    config without the key (checkpoints from before it) trained without rescaling."""
    if rescale not in ("auto", "true", "false"):
        raise ValueError(f"rescale must be auto, true or false, not {rescale!r}")
    return bool(init) if rescale == "auto" else rescale == "true"


@dataclass
class ModelConfig:
    size: str = "demo"  # a key of SIZES, or "demo" (sample.build_model)
    text_encoder: str = "bytes"  # "bytes" (small, trained with the U-Net) or "openclip" (frozen, VideoCrafter2's)
    autoencoder: str = "pixel"  # "pixel" (no weights) or "kl-f8" (frozen, VideoCrafter2's)
    pixel_patch: int = 2
    kl_size: str = "full"  # a key of KL_SIZES
    openclip_model: str = "ViT-H-14"  # an open_clip model config; only its text tower is built
    max_text_len: int = 64  # of the bytes text encoder
    temporal_dropout: float = 0.1
    gradient_checkpointing: bool = False
    noise_shift: float = 1.0  # loss.shift_snr: the schedule's signal-to-noise ratio / noise_shift^2 (the demo's: 2)
    zero_terminal_snr: bool = False  # DynamiCrafter's betas rescaled to zero terminal SNR (loss.zero_terminal_snr)
    rescale: bool = False  # VideoCrafter2's input rescaling s_t of z0 (loss.input_scale), which its checkpoint learned

    @classmethod
    def from_run_config(cls, config: dict) -> "ModelConfig":
        """The model a train.py config describes (a plain dict, as checkpoints store it): its `model` key names the
        size; its keys named like this class's fields are taken as they are, the rest are not the model's."""
        fields = {name: config[name] for name in cls.__dataclass_fields__ if name != "size" and name in config}
        fields["rescale"] = resolve_rescale(config.get("rescale", "false"), config.get("init", ""))
        return cls(size=config["model"], **fields)


class MotifModel(nn.Module):
    """Autoencoder + text encoder + x-cat U-Net. Trainable: the U-Net and the bytes text encoder; the KL
    autoencoder and the OpenCLIP text encoder are frozen. The U-Net's context_dim is the text encoder's width."""

    def __init__(self, cfg: ModelConfig, unet_cfg: UNetConfig = None):
        """unet_cfg: the U-Net's size, SIZES[cfg.size] if not given (sample.build_model gives the demo's)."""
        super().__init__()
        if unet_cfg is None and cfg.size not in SIZES:
            raise ValueError(f"unknown model size {cfg.size!r}; choose one of {', '.join(SIZES)}")
        if cfg.autoencoder not in ("pixel", "kl-f8") or cfg.text_encoder not in ("bytes", "openclip"):
            raise ValueError(f"unknown autoencoder/text encoder {cfg.autoencoder!r}/{cfg.text_encoder!r}; "
                             "autoencoders: pixel, kl-f8; text encoders: bytes, openclip")
        if cfg.autoencoder == "kl-f8" and cfg.kl_size not in KL_SIZES:
            raise ValueError(f"unknown kl-f8 size {cfg.kl_size!r}; choose one of {sorted(KL_SIZES)}")
        self.cfg = cfg
        unet_cfg = unet_cfg or SIZES[cfg.size]
        if cfg.autoencoder == "pixel":
            self.autoencoder = PixelAutoencoder(cfg.pixel_patch)
        else:
            self.autoencoder = KLAutoencoder(KL_SIZES[cfg.kl_size])
        if cfg.text_encoder == "bytes":
            self.text_encoder = BytesTextEncoder(unet_cfg.context_dim, cfg.max_text_len)
        else:
            self.text_encoder = OpenCLIPTextEncoder(cfg.openclip_model)
        abar = linear_alphas_cumprod()  # VideoCrafter2's; DynamiCrafter's zero-SNR option; the demo's shifted
        if cfg.zero_terminal_snr:
            abar = zero_terminal_snr(abar)
        if cfg.noise_shift != 1:
            abar = shift_snr(abar, cfg.noise_shift)
        self.schedule = Schedule(abar, rescale=cfg.rescale)  # for training and sampling
        c = self.autoencoder.latent_channels
        self.unet = build_unet(replace(unet_cfg, context_dim=self.text_encoder.width, in_channels=2 * c, out_channels=c,
                                       temporal_dropout=cfg.temporal_dropout,
                                       gradient_checkpointing=cfg.gradient_checkpointing))

    @property
    def resolution_factor(self):
        """Frame sides must be multiples of this: the autoencoder's factor times the U-Net's downsamplings."""
        return self.autoencoder.factor * 2 ** (len(self.unet.cfg.channel_mult) - 1)

    def latent_shape(self, clip_shape):
        """A clip's (T, H, W) -> its latent's (C, T, h, w), known before encoding (for the posterior's draws)."""
        frames, height, width = clip_shape
        f = self.autoencoder.factor
        return torch.Size((self.autoencoder.latent_channels, frames, height // f, width // f))

    def encode_video(self, video, noise=None):
        """video (B, 3, T, H, W) in [-1, 1] -> z0 (B, C, T, h, w); with N(0, 1) noise of z0's shape, a posterior
        sample (kl-f8; the pixel autoencoder has none), not its mean."""
        return self.autoencoder.encode(video, noise)  # (B, C, T, h, w)

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


# ----------------------------------------------------------------------------- where it runs: the device and bf16 autocast

def pick_device(name="auto"):
    """"auto" (the GPU if there is one, else the CPU), "cpu", "cuda" or "cuda:N" -> torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name}, but no CUDA GPU is visible")
    return torch.device(name)


def wants_bf16(dtype, device):
    """A run's `dtype` ("auto": bf16 on a GPU, fp32 on the CPU; "bf16"; "fp32") on `device` -> whether it computes in
    bf16. Training, its validation samples, sample.py, demo/bench.py and data.py's latent cache all decide it here."""
    return dtype == "bf16" or (dtype == "auto" and device.type == "cuda")


def autocast(device, bf16, cache=True):
    """The one precision context of a forward: bf16 autocast, or nothing (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache) if bf16 else nullcontext()


# ----------------------------------------------------------------------------- VideoCrafter2's U-Net
# MotifModel calls it as UNet(cat[z_t, z_img], t, context, fps) -> v_hat (B, C, T, h, w), in training and sampling.
# It follows VideoCrafter2 (lvdm/modules/networks/openaimodel3d.py) module for module, and its attribute names are
# that code's parameter names (`input_blocks.1.0.in_layers.2.weight`, even the upstream spelling `temopral_conv`), so
# a VideoCrafter2 checkpoint and the reference vectors in tests/fixtures load with no key map. Attention goes through
# PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels on GPU). Nothing here is the CPU demo's:
# its extra conditioning is demo/unet.py's, a subclass.

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

    def unet_class(self):
        """The U-Net this config builds (build_unet): a subclass's config names its own."""
        return UNet


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


class Stage(nn.Sequential):
    """A sequence of layers that each get what they need: ResBlocks the embedding, transformers the text.
    A Sequential (its layers keyed 0, 1, ... as a ModuleList keys them) because torch 2.7 to 2.11's FSDP2 refuse a
    ModuleList as a unit even when it has a forward, and each Stage is one unit of sharded training."""

    def __init__(self, layers):
        super().__init__(*layers)

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
        cross-attention only. A hook for demo/unet.py's U-Net, which adds two embeddings here, where they were first
        written, so that its parameters are drawn in the same order from the same seed."""

    def run(self, stage, h, emb, context, batch_size):
        if self.cfg.gradient_checkpointing and self.training:
            return checkpoint(stage, h, emb, context, batch_size, use_reentrant=False)
        return stage(h, emb, context, batch_size)

    def embed(self, t, fps, context, frames):
        """The embedding every ResBlock adds: t (B,), fps (B,) -> (B*T, E), one row per frame. VideoCrafter2's does
        not read the text (context); demo/unet.py's U-Net, which overrides this, does."""
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


SIZES = {
    # the size of ../shared/reference/unet_vc2_tiny.pt (parity test)
    "tiny": UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), head_channels=16, context_dim=64),
    # VideoCrafter2's U-Net (1.41 B parameters at 4 input channels)
    "vc2": UNetConfig(),
}


# ----------------------------------------------------------------------------- the encoders: text encoders
# captions -> context: BytesTextEncoder (the demo's, UTF-8 bytes through a small transformer, trained with the U-Net)
# or OpenCLIPTextEncoder (VideoCrafter2's, frozen: OpenCLIP ViT-H-14's penultimate layer). Parameter names are
# open_clip's, so VideoCrafter2's `cond_stage_model.model.*` load with no key map.

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


# ----------------------------------------------------------------------------- the encoders: autoencoders
# video <-> latents: PixelAutoencoder (no weights: space-to-depth) or KLAutoencoder (Stable Diffusion's kl-f8,
# frozen), with lvdm's parameter names, so VideoCrafter2's `first_stage_model.*` load with no key map.

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


# ----------------------------------------------------------------------------- our checkpoints
# out_dir/ckpt_0001000.pt, ... and out_dir/latest, a one-line text file naming the newest complete one (train.py
# writes them). A checkpoint is a plain dict {"kind", "step", "config" (train.py's Config as a dict), "model", "ema",
# "optimizer"}. Every torch.load uses weights_only=True: a checkpoint is untrusted input and never runs code.

CHECKPOINT_KIND = "motif-ti2v"


def resolve_checkpoint(path):
    """A checkpoint file, or a run folder -> the file its `latest` pointer names."""
    path = Path(path)
    if path.is_dir():
        pointer = path / "latest"
        if not pointer.is_file():
            raise ValueError(f"{path} is a folder without a 'latest' checkpoint pointer (no checkpoint saved there yet)")
        return path / pointer.read_text().strip()
    return path


def load_checkpoint(path):
    """Load a checkpoint of ours (a file or a run folder); a clear error for anything else. Memory-mapped: the ranks
    of a resumed run share one copy in the page cache, and each reads only what it uses (a sharded run: its shards)."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist" + (" or is a folder" if path.exists() else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated file, a pickle with code, not a torch file at all
        raise ValueError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is not a MotiF checkpoint written by train.py")
    return ckpt


# ----------------------------------------------------------------------------- VideoCrafter2's checkpoint
# Its released model.ckpt (--init of the full recipe) holds the U-Net under `model.diffusion_model.`, the KL-f8
# autoencoder under `first_stage_model.` and the OpenCLIP text tower under `cond_stage_model.`; this file uses the same
# names, so they load with no key map. The text-to-video U-Net has C input channels, ours 2C (x-cat): the C
# image-latent channels of the first conv start at zero, so the loaded model computes exactly what it did before.

def read_state_dict(path) -> dict:
    """The state dict in a checkpoint file (bare, or under "state_dict"), wrappers stripped. Read with
    weights_only=True, so a file carrying code is refused, and memory-mapped where the format allows (VideoCrafter2's
    model.ckpt is 5.5 GB). Anything unreadable is a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code, a truncated file, not a torch file at all
        raise ValueError(f"cannot read {path}: {str(e).splitlines()[0][:200]}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    return strip_wrappers(state)


def strip_wrappers(state_dict: dict) -> dict:
    """Drop the `module.` of DistributedDataParallel and the `_orig_mod.` of torch.compile from every key."""
    return {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in state_dict.items()}


def check_fits(module: nn.Module, state_dict: dict, what: str) -> None:
    """Strict loading's checks, as one line: a ValueError that says how the state dict does not fit."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{what} does not fit this model size: {len(missing)} missing keys (e.g. {missing[:2]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(wrong)} of another shape "
                         f"(e.g. {wrong[:2]})")


def xcat_unet_state(unet: UNet, state_dict: dict) -> dict:
    """A text-to-video U-Net's weights (C input channels) made fit for our x-cat U-Net (2C): the C image-latent
    input channels of the first conv start at zero, so the model computes what it did before. Checked to fit."""
    key = "input_blocks.0.0.weight"
    if key not in state_dict:
        raise ValueError("not a VideoCrafter-style U-Net state dict (no input_blocks.0.0.weight)")
    ours = unet.input_blocks[0][0].weight
    theirs = state_dict[key]  # (C_out, C, 3, 3)
    if theirs.shape[1] * 2 == ours.shape[1] and theirs.shape[0] == ours.shape[0]:
        state_dict = {**state_dict, key: torch.cat([theirs, torch.zeros_like(theirs)], dim=1)}  # (C_out, 2C, 3, 3)
    check_fits(unet, state_dict, "U-Net")
    return state_dict


def load_t2v_unet(unet: UNet, state_dict: dict) -> None:
    """Load a text-to-video U-Net (C input channels) into our x-cat U-Net (2C), new channels at zero.
    Accepts VideoCrafter2's `model.diffusion_model.` prefix and `module.` / `_orig_mod.` wrappers."""
    prefix = "model.diffusion_model."
    state_dict = strip_wrappers(state_dict)
    if any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    unet.load_state_dict(xcat_unet_state(unet, state_dict))


# ----------------------------------------------------------------------------- VideoCrafter2 (--init)

VIDEOCRAFTER2_PARTS = {"unet": "model.diffusion_model.", "autoencoder": "first_stage_model.",
                       "text_encoder": "cond_stage_model."}


def load_videocrafter2(model: MotifModel, checkpoint: dict) -> dict:
    """Load VideoCrafter2's released text-to-video model.ckpt (or any checkpoint of that layout, possibly inside
    {"state_dict": ...}, with `module.` / `_orig_mod.` wrappers) into `model`, each part strictly:
    model.diffusion_model.* -> the U-Net (its C-channel first conv into our 2C x-cat conv, image-latent channels
    at zero), first_stage_model.* -> the kl-f8 autoencoder, cond_stage_model.* -> the openclip text encoder.
    A part the model does not use (the pixel autoencoder, the bytes text encoder) is ignored, as are the other
    keys (the noise schedule's buffers). Every part is checked before any is loaded: a checkpoint that does not
    fit (missing, unexpected or misshapen keys, or no keys for a part the model needs) raises a one-line
    ValueError with the counts and leaves the model as it was.
    Returns {"unet" | "autoencoder" | "text_encoder" | "other": {"loaded": n, "ignored": n}}, in tensors."""
    state_dict = strip_wrappers(checkpoint.get("state_dict", checkpoint))
    parts = {part: {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
             for part, prefix in VIDEOCRAFTER2_PARTS.items()}
    used = {"unet": True, "autoencoder": isinstance(model.autoencoder, KLAutoencoder),
            "text_encoder": isinstance(model.text_encoder, OpenCLIPTextEncoder)}
    for part, prefix in VIDEOCRAFTER2_PARTS.items():
        if used[part] and not parts[part]:
            raise ValueError(f"the checkpoint has no {prefix}* keys, which this model's {part} needs "
                             f"(is it a VideoCrafter2 checkpoint? model {model.cfg.size}, autoencoder "
                             f"{model.cfg.autoencoder}, text encoder {model.cfg.text_encoder})")
    parts["unet"] = xcat_unet_state(model.unet, parts["unet"])
    for part in ("autoencoder", "text_encoder"):
        if used[part]:
            check_fits(getattr(model, part), parts[part], f"{VIDEOCRAFTER2_PARTS[part]}* ({part})")
    report = {}
    for part, weights in parts.items():
        if used[part]:
            getattr(model, part).load_state_dict(weights)
        report[part] = {"loaded": len(weights), "ignored": 0} if used[part] else {"loaded": 0, "ignored": len(weights)}
    report["other"] = {"loaded": 0, "ignored": len(state_dict) - sum(len(weights) for weights in parts.values())}
    return report


def load_kl_autoencoder(state_dict: dict, size: str = "full") -> KLAutoencoder:
    """The frozen kl-f8 autoencoder from a VideoCrafter2-layout state dict (its first_stage_model.* keys)."""
    prefix = VIDEOCRAFTER2_PARTS["autoencoder"]
    weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    autoencoder = KLAutoencoder(KL_SIZES[size])
    check_fits(autoencoder, weights, f"{prefix}* (autoencoder)")
    autoencoder.load_state_dict(weights)
    return autoencoder



def init_from(model: MotifModel, path) -> str:
    """--init: VideoCrafter2's model.ckpt (U-Net, KL-f8 autoencoder, OpenCLIP), or a bare text-to-video U-Net
    state dict; either way the new image-latent input channels start at zero. Returns what was loaded, in words."""
    state = read_state_dict(path)
    if any(k.startswith(VIDEOCRAFTER2_PARTS["unet"]) for k in state):
        report = load_videocrafter2(model, state)
        return f"--init {path}: " + ", ".join(f"{part} {n['loaded']} tensors loaded" + (
            f", {n['ignored']} ignored" if n["ignored"] else "") for part, n in report.items())
    load_t2v_unet(model.unet, state)
    return f"--init {path}: U-Net loaded, image-latent input channels at zero"
