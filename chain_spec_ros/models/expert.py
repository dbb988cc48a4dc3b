"""Flow-matching trajectory expert (Alpamayo-R1's action head, at small scale).

64 action query tokens, one per future waypoint (10 Hz, 6.4 s), hold a noisy (acceleration,
curvature) sequence. Layer i of the expert attends, without a causal mask, over the decoder's
cached layer-i keys/values for the prompt + CoC plus the action tokens' own keys/values, which is
why the expert has the decoder's layer count and KV shape but may be narrower. The expert
predicts the rectified-flow velocity (data - noise); sampling integrates it with a few Euler
steps from Gaussian noise at t=0 to data at t=1.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..trajectory import STEP_SECONDS
from .config import DecoderConfig, ExpertConfig
from .decoder import DecoderLayer, KVHook, RMSNorm
from .kv_cache import KVCache
from .rope import RotaryEmbedding, text_position_ids


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of flow time t [B] in [0, 1] -> [B, dim]. t is scaled by 1000 so the
    low frequencies still vary over [0, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def prepend(prefix_k: Tensor, prefix_v: Tensor) -> KVHook:
    """KV hook: attend over the decoder's cached prefix followed by the action tokens' own k, v."""
    return lambda k, v: (torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2))


class ActionNormalizer(nn.Module):
    """Per-channel mean/std of (acceleration, curvature), kept as buffers so they are saved
    with the weights. Flow matching wants targets of unit scale."""

    def __init__(self, action_dim: int = 2):
        super().__init__()
        self.register_buffer("mean", torch.zeros(action_dim))
        self.register_buffer("std", torch.ones(action_dim))

    @classmethod
    def from_stats(cls, mean, std) -> "ActionNormalizer":
        """A normalizer holding these per-channel statistics (e.g. those an export recorded)."""
        normalizer = cls(len(mean))
        normalizer.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        normalizer.std.copy_(torch.as_tensor(std, dtype=torch.float32))
        return normalizer

    @torch.no_grad()
    def fit(self, actions: Tensor) -> None:
        """actions [..., action_dim] from the training set."""
        flat = actions.reshape(-1, actions.shape[-1]).float()
        self.mean.copy_(flat.mean(0))
        self.std.copy_(flat.std(0).clamp_min(1e-6))

    def normalize(self, actions: Tensor) -> Tensor:
        return (actions - self.mean) / self.std

    def denormalize(self, actions: Tensor) -> Tensor:
        return actions * self.std + self.mean


class TrajectoryExpert(nn.Module):
    def __init__(self, cfg: ExpertConfig, dec: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.action_in = nn.Linear(cfg.action_dim, h)
        self.time_mlp = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))
        self.step_embed = nn.Parameter(torch.randn(cfg.horizon, h) * 0.02)
        self.layers = nn.ModuleList(
            DecoderLayer(h, cfg.num_heads, dec.num_kv_heads, dec.head_dim, cfg.intermediate_size,
                         dec.rms_norm_eps)
            for _ in range(dec.num_layers)
        )
        self.norm = RMSNorm(h, dec.rms_norm_eps)
        self.action_out = nn.Linear(h, cfg.action_dim)
        self.rotary_emb = RotaryEmbedding(dec.head_dim, dec.rope_theta, dec.mrope_section)
        self.normalizer = ActionNormalizer(cfg.action_dim)

    def forward(self, x_t: Tensor, t: Tensor, cache: KVCache, rope_delta: int | Tensor,
                prefix_lengths: Tensor | None = None) -> Tensor:
        """Velocity [B, H, action_dim] for noisy actions x_t [B, H, action_dim] at flow time t [B].

        cache: the decoder's cache holding prompt + CoC (read only). Its batch is 1 or B.
        Action token i sits at text position cache.length + rope_delta + i, as if it were the
        next text token, so it is rotated consistently with the cached keys.
        prefix_lengths [B]: for a batch whose CoCs differ in length (training), the valid cache
        length of each sample; keys past it are masked and positions continue from it.
        """
        B, H, _ = x_t.shape
        time = self.time_mlp(timestep_embedding(t, self.cfg.hidden_size))
        x = self.action_in(x_t) + time[:, None] + self.step_embed[:H]
        mask = None  # by default every action token sees the whole prefix and each other
        if prefix_lengths is None:
            pos = text_position_ids(cache.length, H, rope_delta, x.device).expand(B, H)
        else:
            pos = text_position_ids(0, H, prefix_lengths + rope_delta, x.device)
            keys = torch.arange(cache.length + H, device=x.device)
            mask = ((keys[None] < prefix_lengths[:, None]) | (keys[None] >= cache.length))[:, None, None, :]
        cos, sin = self.rotary_emb(pos)
        for i, layer in enumerate(self.layers):
            pk, pv = cache.get(i)
            x = layer(x, cos, sin, prepend(pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)), mask=mask)
        return self.action_out(self.norm(x))

    def flow_matching_loss(self, cache: KVCache, rope_delta: int | Tensor, target_actions: Tensor,
                           generator: torch.Generator | None = None,
                           prefix_lengths: Tensor | None = None) -> Tensor:
        """Rectified-flow loss on normalised target actions [B, H, action_dim].

        x_t = (1 - t) * noise + t * data, target velocity = data - noise. Gradients reach the
        decoder only if the cache was filled with grad enabled.
        """
        x1 = target_actions
        B = x1.shape[0]
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        t = torch.rand(B, generator=generator, device=x1.device, dtype=x1.dtype)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
        return F.mse_loss(self(x_t, t, cache, rope_delta, prefix_lengths), x1 - x0)

    @torch.no_grad()
    def sample(self, cache: KVCache, rope_delta: int | Tensor, steps: int | None = None,
               generator: torch.Generator | None = None, batch_size: int | None = None,
               noise: Tensor | None = None) -> Tensor:
        """Euler-integrate the flow from noise (t=0) to data (t=1) -> normalised [B, H, dim].

        `noise` [B, H, dim] fixes the starting point (e.g. the same noise for every row, so rows
        differ only through what they read from the cache)."""
        B = batch_size or cache.batch_size
        dev = self.action_in.weight.device
        x = noise.to(dev) if noise is not None else torch.randn(
            B, self.cfg.horizon, self.cfg.action_dim, generator=generator, device=dev)
        return integrate_flow(lambda x, t: self(x, torch.full((x.shape[0],), t, device=dev), cache, rope_delta), x,
                              steps or self.cfg.euler_steps)


def integrate_flow(velocity: Callable[[Tensor, float], Tensor], noise: Tensor, steps: int) -> Tensor:
    """Euler integration of a rectified flow from noise at t = 0 to data at t = 1:
    x += velocity(x, i / steps) / steps for i < steps. `velocity` is the expert, in torch or as
    an exported graph."""
    x = noise
    for i in range(steps):
        x = x + velocity(x, i / steps) / steps
    return x


class Trajectory(NamedTuple):
    accel: Tensor  # [..., H] m/s^2
    curvature: Tensor  # [..., H] 1/m
    x: Tensor  # [..., H] m forward
    y: Tensor  # [..., H] m left
    yaw: Tensor  # [..., H] rad
    speed: Tensor  # [..., H] m/s


def integrate_unicycle(accel: Tensor, curvature: Tensor, v0: Tensor | float, dt: float = STEP_SECONDS
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Roll a unicycle forward from the origin (heading 0, x forward, y left) at speed v0.

    accel, curvature [..., H] hold per-step controls; v0 is a scalar or [...]. Waypoint k is the
    state after k + 1 steps. Speed is clamped at >= 0 (no reversing); each step moves the
    trapezoidal distance ds along an exact circular arc of the step's curvature (the chord has
    length ds * sinc(dyaw / 2) and heading yaw + dyaw / 2), so constant curvature traces an exact
    circle. Returns x, y, yaw, speed, each [..., H].
    """
    v0 = torch.as_tensor(v0, dtype=accel.dtype, device=accel.device)
    speed = v0.expand(accel.shape[:-1])
    x = y = yaw = torch.zeros_like(speed)
    out: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for k in range(accel.shape[-1]):
        next_speed = (speed + accel[..., k] * dt).clamp_min(0.0)
        ds = 0.5 * (speed + next_speed) * dt
        dyaw = curvature[..., k] * ds
        chord = ds * torch.sinc(dyaw / (2 * math.pi))  # torch.sinc(u) = sin(pi u) / (pi u)
        x = x + chord * torch.cos(yaw + dyaw / 2)
        y = y + chord * torch.sin(yaw + dyaw / 2)
        yaw, speed = yaw + dyaw, next_speed
        out.append((x, y, yaw, speed))
    xs, ys, yaws, speeds = (torch.stack(seq, dim=-1) for seq in zip(*out))
    return xs, ys, yaws, speeds


def trajectory_from_actions(actions: Tensor, v0: Tensor | float, dt: float = STEP_SECONDS) -> Trajectory:
    """The expert's denormalised actions [..., H, 2] (acceleration, curvature), driven by the
    unicycle from speed v0 (scalar or [...])."""
    accel, curvature = actions[..., 0], actions[..., 1]
    return Trajectory(accel, curvature, *integrate_unicycle(accel, curvature, v0, dt))
