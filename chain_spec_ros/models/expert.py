"""Alpamayo-R1's trajectory side: the expert, its action projections, the flow and the action space.

64 action tokens, one per future waypoint (10 Hz, 6.4 s), hold a noisy (acceleration, curvature)
pair. `action_in_proj` encodes each pair and the flow time with Fourier features and an MLP;
the expert is a Qwen3-VL text model made from the VLM's text config with the expert overrides
(so it keeps the VLM's layer count, KV heads and head_dim) and without token embeddings: layer i
attends, without a causal mask, over the VLM's cached layer-i keys/values for prompt + CoC plus
the action tokens' own. `action_out_proj` reads the flow velocity (data - noise) off the last
hidden states; sampling integrates it with Euler steps from Gaussian noise at t=0 to data at
t=1. The unicycle action space normalises the actions and integrates them into a path.
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


def prepend(prefix_k: Tensor, prefix_v: Tensor) -> KVHook:
    """KV hook: attend over the decoder's cached prefix followed by the action tokens' own k, v."""
    return lambda k, v: (torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2))


class FourierFeatures(nn.Module):
    """sqrt(2) * [sin(2 pi f x), cos(2 pi f x)] for `dim / 2` frequencies spaced
    logarithmically from 1 to max_freq."""

    def __init__(self, dim: int, max_freq: float):
        super().__init__()
        self.out_dim = dim
        self.register_buffer("freqs", torch.logspace(0, math.log10(max_freq), steps=dim // 2)[None, :])

    def forward(self, x: Tensor) -> Tensor:
        angle = x[..., None] * self.freqs * 2 * math.pi
        return torch.cat([angle.sin(), angle.cos()], dim=-1) * math.sqrt(2)


class MLPEncoder(nn.Module):
    """Linear + SiLU, then (layers - 1) x [RMSNorm, Linear, SiLU], then RMSNorm + Linear out."""

    def __init__(self, in_features: int, layers: int, hidden: int, out_features: int):
        super().__init__()
        trunk: list[nn.Module] = [nn.Linear(in_features, hidden), nn.SiLU()]
        for _ in range(layers - 1):
            trunk += [RMSNorm(hidden, 1e-5), nn.Linear(hidden, hidden), nn.SiLU()]
        trunk += [RMSNorm(hidden, 1e-5), nn.Linear(hidden, out_features)]
        self.trunk = nn.Sequential(*trunk)

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk(x)


class ActionInProjection(nn.Module):
    """Alpamayo's per-waypoint input projection: Fourier features of each action channel and of
    the flow time, concatenated, through the MLP encoder and a LayerNorm."""

    def __init__(self, cfg: ExpertConfig):
        super().__init__()
        self.sinus = nn.ModuleList(FourierFeatures(cfg.fourier_features, cfg.max_freq) for _ in range(cfg.action_dim))
        self.timestep_fourier_encoder = FourierFeatures(cfg.fourier_features, cfg.max_freq)
        features = cfg.fourier_features * (cfg.action_dim + 1)
        self.encoder = MLPEncoder(features, cfg.proj_layers, cfg.proj_hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x [B, H, action_dim], t [B] -> [B, H, hidden]."""
        B, H, _ = x.shape
        actions = torch.cat([encode(x[:, :, i].float()) for i, encode in enumerate(self.sinus)], dim=-1)
        time = self.timestep_fourier_encoder(t.float())[:, None].expand(B, H, -1)
        features = torch.cat([actions, time], dim=-1).to(self.norm.weight.dtype)
        return self.norm(self.encoder(features))


class UnicycleActionSpace(nn.Module):
    """(acceleration, curvature) per 0.1 s step: per-channel normalisation with the statistics
    kept as buffers (saved with the weights), and the integration into a path."""

    def __init__(self, dt: float = STEP_SECONDS):
        super().__init__()
        self.dt = dt
        for name, value in (("accel_mean", 0.0), ("accel_std", 1.0), ("curvature_mean", 0.0), ("curvature_std", 1.0)):
            self.register_buffer(name, torch.tensor(value))

    @property
    def mean(self) -> Tensor:
        return torch.stack([self.accel_mean, self.curvature_mean])

    @property
    def std(self) -> Tensor:
        return torch.stack([self.accel_std, self.curvature_std])

    def set_stats(self, mean, std) -> "UnicycleActionSpace":
        mean, std = (torch.as_tensor(v, dtype=torch.float32) for v in (mean, std))
        for name, value in (("accel_mean", mean[0]), ("accel_std", std[0]), ("curvature_mean", mean[1]),
                            ("curvature_std", std[1])):
            getattr(self, name).copy_(value)
        return self

    @torch.no_grad()
    def fit(self, actions: Tensor) -> None:
        """actions [..., 2] from the training set."""
        flat = actions.reshape(-1, actions.shape[-1]).float()
        self.set_stats(flat.mean(0), flat.std(0).clamp_min(1e-6))

    def normalize(self, actions: Tensor) -> Tensor:
        return (actions - self.mean) / self.std

    def denormalize(self, actions: Tensor) -> Tensor:
        return actions * self.std + self.mean


class TrajectoryExpert(nn.Module):
    def __init__(self, cfg: ExpertConfig, dec: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.action_in_proj = ActionInProjection(cfg)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.hidden_size, cfg.num_heads, dec.num_kv_heads, dec.head_dim, cfg.intermediate_size,
                         dec.rms_norm_eps)
            for _ in range(dec.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, dec.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(dec.head_dim, dec.rope_theta, dec.mrope_section)
        self.action_out_proj = nn.Linear(cfg.hidden_size, cfg.action_dim)
        self.action_space = UnicycleActionSpace()

    def forward(self, x_t: Tensor, t: Tensor, cache: KVCache, rope_delta: int | Tensor,
                prefix_lengths: Tensor | None = None) -> Tensor:
        """Velocity [B, H, action_dim] for noisy actions x_t [B, H, action_dim] at flow time t [B].

        cache: the decoder's cache holding prompt + CoC + `<|traj_future_start|>` (read only); its
        batch is 1 or B. Action token i sits at text position cache.length + rope_delta + i, the
        positions right after `<|traj_future_start|>`, as Alpamayo places them.
        prefix_lengths [B]: for a batch whose CoCs differ in length (training), the valid cache
        length of each sample; keys past it are masked and positions continue from it.
        """
        B, H, _ = x_t.shape
        x = self.action_in_proj(x_t, t)
        mask = None  # every action token sees the whole prefix and each other
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
        return self.action_out_proj(self.norm(x))

    def flow_matching_loss(self, cache: KVCache, rope_delta: int | Tensor, target_actions: Tensor,
                           generator: torch.Generator | None = None,
                           prefix_lengths: Tensor | None = None) -> Tensor:
        """Flow-matching loss on normalised target actions [B, H, action_dim], as Alpamayo trains
        it: x_t = t * data + (1 - t) * noise, velocity target data - noise, t = 0.999 (1 - s)
        with s ~ Beta(1.5, 1), which leans toward the noisy end. Gradients reach the decoder only
        if the cache was filled with grad enabled."""
        x1 = target_actions
        B = x1.shape[0]
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        u = torch.rand(B, generator=generator, device=x1.device, dtype=x1.dtype)
        t = 0.999 * (1 - u ** (1 / 1.5))  # Beta(1.5, 1) by its inverse CDF: s = u^(1/1.5)
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
        dev = self.action_out_proj.weight.device
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
    """Alpamayo's unicycle from the origin (heading 0, x forward, y left) at speed v0.

    accel, curvature [..., H] hold per-step controls; v0 is a scalar or [...]. Waypoint k is the
    state after k + 1 steps: v_{k+1} = v_k + a_k dt; theta_{k+1} = theta_k + kappa_k (v_k dt +
    a_k dt^2 / 2), the heading change over the distance the step travels; x and y by the
    trapezoid rule over the two ends' velocity vectors. No clamping, as in the release: a
    plan may end slightly below zero speed at a stop. Returns x, y, yaw,
    speed, each [..., H].
    """
    v0 = torch.as_tensor(v0, dtype=accel.dtype, device=accel.device).expand(accel.shape[:-1])
    speed = torch.cat([v0[..., None], v0[..., None] + torch.cumsum(accel * dt, dim=-1)], dim=-1)
    turn = curvature * (speed[..., :-1] * dt + 0.5 * accel * dt * dt)
    yaw = torch.cat([torch.zeros_like(v0)[..., None], torch.cumsum(turn, dim=-1)], dim=-1)
    vx, vy = speed * torch.cos(yaw), speed * torch.sin(yaw)
    x = torch.cumsum(0.5 * dt * (vx[..., :-1] + vx[..., 1:]), dim=-1)
    y = torch.cumsum(0.5 * dt * (vy[..., :-1] + vy[..., 1:]), dim=-1)
    return x, y, yaw[..., 1:], speed[..., 1:]


def trajectory_from_actions(actions: Tensor, v0: Tensor | float, dt: float = STEP_SECONDS) -> Trajectory:
    """The expert's denormalised actions [..., H, 2] (acceleration, curvature), driven by the
    unicycle from speed v0 (scalar or [...])."""
    accel, curvature = actions[..., 0], actions[..., 1]
    return Trajectory(accel, curvature, *integrate_unicycle(accel, curvature, v0, dt))
