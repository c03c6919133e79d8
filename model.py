"""The text-image-to-video model: MotifModel puts a U-Net between a text encoder and an autoencoder (encoders.py).

Data flow (DESIGN.md): video -> autoencoder.encode -> z0 (B, C, T, h, w); the first frame's latent is repeated over
T and concatenated on channels with the noisy latent z_t (x-cat); prompt -> text encoder -> context (B, L, D);
UNet(cat[z_t, z_img], t, context, fps) -> v_hat. The U-Net is VideoCrafter2's (unet.py), or, for the CPU demo's
`demo` size, demo.py's subclass with the extra conditioning a 3 M-parameter model needs at 32x32. checkpoint.py
loads the U-Net and the frozen encoders from VideoCrafter2's model.ckpt. The U-Net's FLOPs per training clip (for
MFU in train.py's log) are counted here, on the meta device.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from demo import DemoUNet, DemoUNetConfig, demo_alphas_cumprod
from encoders import KL_SIZES, BytesTextEncoder, KLAutoencoder, OpenCLIPTextEncoder, PixelAutoencoder
from loss import Schedule, linear_alphas_cumprod, zero_terminal_snr
from unet import UNet, UNetConfig

SIZES = {
    # the size of ../shared/reference/unet_vc2_tiny.pt (parity test)
    "tiny": UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), head_channels=16, context_dim=64),
    # the CPU demo on 32x32 shapes videos with the pixel autoencoder at patch 2 (16x16x12 latents): demo.py's U-Net
    "demo": DemoUNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                           head_channels=32, context_dim=64, init_attn_heads=1, scale_shift_norm=True,
                           input_skip_below=400),
    # VideoCrafter2's U-Net (1.41 B parameters at 4 input channels)
    "vc2": UNetConfig(),
}


def build_unet(cfg: UNetConfig) -> UNet:
    """The U-Net a config describes: demo.py's for a DemoUNetConfig, else VideoCrafter2's."""
    return DemoUNet(cfg) if isinstance(cfg, DemoUNetConfig) else UNet(cfg)


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


def resolve_rescale(rescale, init):
    """train.py's `rescale` (auto | true | false) -> whether z0 is rescaled: auto is on exactly when the U-Net starts
    from --init (VideoCrafter2's checkpoint learned the rescaling; a model from scratch has nothing to match). A run
    config without the key (checkpoints from before it) trained without rescaling."""
    if rescale not in ("auto", "true", "false"):
        raise ValueError(f"rescale must be auto, true or false, not {rescale!r}")
    return bool(init) if rescale == "auto" else rescale == "true"


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
    noise_shift: float = 1.0  # the demo's schedule (demo.demo_alphas_cumprod): signal-to-noise ratio / noise_shift^2
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
        abar = linear_alphas_cumprod()  # VideoCrafter2's; DynamiCrafter's zero-SNR option; the demo's shifted (demo.py)
        if cfg.zero_terminal_snr:
            abar = zero_terminal_snr(abar)
        if cfg.noise_shift != 1:
            abar = demo_alphas_cumprod(abar, cfg.noise_shift)
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
