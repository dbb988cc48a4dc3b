"""The planning pipeline without ROS: prompt -> vision -> prefill -> CoC decoding -> trajectory.

One call plans one scene and reports how long each stage took. The CoC decoder is
pluggable: target-only decoding, or speculative decoding with a drafter, each greedy or
sampled (temperature and top-p, the trajectory tokens suppressed, as Alpamayo's rollout does).
`num_traj_samples` trajectories are drawn from the expert per plan (different flow noise over
the one CoC). The models run behind the engine interface, so the same pipeline serves every
backend.

`load_planner` opens a models directory on a backend; `self_test` plans one synthetic scene
and refuses a model whose outputs are not finite; `plan_problem` is the plausibility check
every published plan passes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .constants import DEFAULT_K
from .engines.base import TargetEngine
from .prompt import PromptBuilder
from .sampling import GREEDY, Sampling
from .speculative import Drafter, speculative_decode
from .trajectory import HISTORY_STEPS, NUM_BINS, STEP_SECONDS, history_bins

MAX_COC_TOKENS = 64


@dataclass
class PlanResult:
    coc_ids: list[int]
    coc: str
    trajectory_xy: np.ndarray  # [64, 2] in the t0 frame: the first sample
    controls: np.ndarray  # [64, 2] (acceleration, curvature) of the first sample
    samples_xy: np.ndarray | None = None  # [num_traj_samples, 64, 2], the first one being trajectory_xy
    timings_ms: dict[str, float] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # speculative decoding: tau, drafted share, ...
    token_sources: list[str] = field(default_factory=list)  # per CoC token: "draft" or "target"


class Planner:
    """Plans one scene; with a `drafter` the CoC is decoded speculatively (k drafts per target
    pass), otherwise token by token by the target alone. `seed` seeds every plan's sampling
    and flow noise, so a plan is a function of its inputs."""

    def __init__(self, target: TargetEngine, builder: PromptBuilder, drafter: Drafter | None = None, k: int = DEFAULT_K,
                 expert_steps: int | None = None, seed: int = 0, sampling: Sampling = GREEDY,
                 num_traj_samples: int = 1):
        if target.config.expert is None:
            raise ValueError("the target has no trajectory expert (a bare Qwen3-VL checkpoint): it cannot plan")
        self.target, self.builder = target, builder
        self.drafter, self.k = drafter, k
        self.expert_steps = expert_steps
        self.seed = seed
        self.sampling = sampling
        self.num_traj_samples = num_traj_samples
        self.max_coc_tokens: int | None = None  # None: MAX_COC_TOKENS; fewer truncates the CoC (a lossy shortcut)
        # Before the expert reads the cache, feed the whole CoC to the target again in one pass
        # (the cache cropped to the prompt). Why: target-only decoding writes the CoC's keys one
        # token at a time and speculative decoding in verify passes of k + 1; equal tokens then
        # give keys equal only to float rounding (trajectories ~1e-6 m apart). Replayed in one
        # pass, the expert reads the same bits whichever decoder chose the tokens, at the cost of
        # one pass over the CoC. Off by default (the node publishes as before); the closed-loop
        # simulator turns it on to compare decoders bit for bit.
        self.replay_coc_for_expert = False
        self.generation = Sampling(0.6, 0.98)  # the model's sampling defaults; load_planner reads them
        self.stop_id = builder.cot_end_id
        self.future_start_id = builder.ids["<|traj_future_start|>"]
        if drafter is not None and list(drafter.feature_layers) != list(target.feature_layers)[: len(drafter.feature_layers)]:
            raise ValueError(f"the drafter reads target layers {drafter.feature_layers} but the target engine "
                             f"returns {target.feature_layers}")

    @property
    def backend(self) -> str:
        return self.target.backend

    def plan(self, images: np.ndarray, history_tokens: np.ndarray, speed: float) -> PlanResult:
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[name] = (now - clock) * 1e3
            clock = now

        # One reading of the settings a node may change from another thread while this runs.
        drafter, k, expert_steps, seed = self.drafter, self.k, self.expert_steps, self.seed
        sampling, num_samples = self.suppressing(self.sampling), max(self.num_traj_samples, 1)
        max_coc, replay = self.max_coc_tokens or MAX_COC_TOKENS, self.replay_coc_for_expert
        generator = torch.Generator().manual_seed(seed)
        prompt = self.builder.build(images, history_tokens)
        max_len = len(prompt) + max_coc + k + 4
        self.target.start(max_len)
        if drafter is not None:
            drafter.start(max_len)
        lap("prompt")
        visual = self.target.encode_images(prompt.images)
        lap("vision")
        logits, features = self.target.prefill(prompt.input_ids, visual, prompt.mrope_positions)
        lap("prefill")
        stats, sources = {"draft_k": k if drafter is not None else 0}, []
        if drafter is None:
            coc_ids = target_decode(self.target, logits, prompt.rope_delta, max_coc, self.stop_id, sampling,
                                    generator)
            sources = ["target"] * len(coc_ids)
        else:
            coc_ids, spec = speculative_decode(self.target, drafter, prompt, logits, features,
                                               self.stop_id, max_coc, k, sampling, generator)
            stats, sources = {**stats, **spec.as_dict()}, spec.token_sources
        lap("decode")
        timings["decode_per_token"] = timings["decode"] / max(len(coc_ids), 1)
        # The expert reads the cache through `<|traj_future_start|>`, as in training.
        tail = [self.stop_id, self.future_start_id]
        if replay:
            self.target.crop(len(prompt))
            tail = coc_ids + tail
        self.target.decode(tail, prompt.rope_delta)
        trajectories = [self.target.trajectory(prompt.rope_delta, float(speed), expert_steps, seed + i)
                        for i in range(num_samples)]
        lap("expert")
        return PlanResult(
            coc_ids=coc_ids,
            coc=self.builder.tokenizer.decode(coc_ids),
            trajectory_xy=trajectories[0].xy,
            controls=trajectories[0].controls,
            samples_xy=np.stack([t.xy for t in trajectories]),
            timings_ms=timings,
            stats=stats,
            token_sources=sources,
        )


    def sampling_for(self, decoding: str, temperature: float = 0.0, top_p: float = 0.0) -> Sampling:
        """The Sampling of a node's settings: greedy, or sampling with the given temperature and
        top-p, each 0 meaning the model's generation_config (`generation_defaults`)."""
        if decoding == "greedy":
            return GREEDY
        default = self.generation
        return Sampling(temperature or default.temperature, top_p or default.top_p)

    def suppressing(self, sampling: Sampling) -> Sampling:
        """`sampling` with the trajectory-bin tokens suppressed: the CoC is text, as in Alpamayo's
        rollout, which masks its trajectory tokens out of the logits."""
        first = self.builder.tokenizer.bin_offset
        return Sampling(sampling.temperature, sampling.top_p, range(first, first + NUM_BINS))


def target_decode(target: TargetEngine, first_logits, rope_delta: int, max_new: int, stop_id: int,
                  sampling: Sampling = GREEDY, generator: torch.Generator | None = None) -> list[int]:
    """Target-only decoding, greedy or sampled, until `stop_id` (not included) or max_new tokens.

    The cache ends holding the prompt and every emitted CoC token, but not the stop token.
    """
    tokens: list[int] = []
    token, _ = sampling.choose(first_logits, generator)
    while token != stop_id and len(tokens) < max_new:
        tokens.append(token)
        logits, _ = target.decode([token], rope_delta)
        token, _ = sampling.choose(logits[-1], generator)
    return tokens


def generation_defaults(target_dir: Path) -> Sampling:
    """Temperature and top-p of the model's generation_config.json (in the target folder or the
    folder its `vlm_name_or_path` names), else Alpamayo's release values 0.6 / 0.98."""
    import json

    folders = [target_dir]
    config = target_dir / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("vlm_name_or_path"):
        folders.append(target_dir / json.loads(config.read_text())["vlm_name_or_path"])
    for path in (folder / "generation_config.json" for folder in folders):
        if path.is_file():
            config = json.loads(path.read_text())
            return Sampling(float(config.get("temperature") or 0.6), float(config.get("top_p") or 0.98))
    return Sampling(0.6, 0.98)


class ModelLoadError(RuntimeError):
    """The models directory cannot be planned with; the message says why."""


def load_planner(models: Path, backend: str = "auto", drafter: str = "auto", draft_dir: str | Path | None = None,
                 k: int = DEFAULT_K, expert_steps: int | None = None, threads: int = 0, draft_int8: bool = True) -> Planner:
    """A planner on the models directory (tokenizer.json, target/, optionally draft/).

    drafter: "eagle" (speculative, with the EAGLE draft from draft_dir or MODELS/draft), "none"
    (target only) or "auto" (eagle when the draft directory exists). backend: see
    `engines.factory.build_engines` (and its draft_int8). Any problem is one ModelLoadError naming the file.
    """
    from .drafters import EagleDrafter
    from .engines.factory import build_engines
    from .models.checkpoint import CheckpointError, load_target_config
    from .models.tokenizer import ChainTokenizer

    models = Path(models).expanduser()
    if not models.is_dir():
        raise ModelLoadError(f"models directory not found: {models} (set the models_dir parameter)")
    draft = Path(draft_dir).expanduser() if draft_dir else models / "draft"
    if drafter == "auto":
        drafter = "eagle" if draft.is_dir() and any(draft.iterdir()) else "none"
    if drafter not in ("eagle", "none"):
        raise ModelLoadError(f"unknown drafter {drafter!r} (eagle, none or auto)")
    try:
        tokenizer = ChainTokenizer.load(models / "tokenizer.json")
        try:  # checked before the engines are built: an ONNX export of the wrong model can take minutes
            expected = load_target_config(models / "target").decoder.vocab_size
        except CheckpointError:
            expected = None  # build_engines names what is wrong with the target
        if expected is not None and tokenizer.vocab_size != expected:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the target expects "
                             f"{expected}: model and tokenizer do not belong together")
        target, draft_engine = build_engines(models, backend, draft if drafter == "eagle" else None, threads=threads,
                                             draft_int8=draft_int8)
        builder = PromptBuilder(tokenizer, *target.config.vision.grid)
        chosen = EagleDrafter(draft_engine, stop_id=builder.cot_end_id) if drafter == "eagle" else None
        planner = Planner(target, builder, drafter=chosen, k=k, expert_steps=expert_steps)
        planner.generation = generation_defaults(models / "target")
        return planner
    except ModelLoadError:
        raise
    except (FileNotFoundError, ValueError, KeyError, OSError) as error:
        raise ModelLoadError(f"cannot load the models from {models}: {error}") from None
    except Exception as error:  # noqa: BLE001 - e.g. a corrupt safetensors file
        raise ModelLoadError(f"cannot load the models from {models}: {type(error).__name__}: {error}") from None


def load_configured_planner(config) -> tuple[Planner, Path]:
    """The planner a node configuration (`node_config.NodeConfig`) asks for, and its models
    directory ('' = the bundled models)."""
    from .paths import default_models_dir

    models = Path(config.models_dir).expanduser() if config.models_dir else default_models_dir()
    planner = load_planner(models, config.backend, config.drafter, config.draft_dir or None, config.draft_k,
                           config.expert_steps or None)
    planner.seed = config.seed
    planner.sampling = planner.sampling_for(config.decoding, config.temperature, config.top_p)
    planner.num_traj_samples = config.num_traj_samples
    return planner, models


class ImplausiblePlan(RuntimeError):
    """A plan whose trajectory is not finite or not physically possible: never published."""


def check_plan(result: PlanResult, max_speed_mps: float) -> PlanResult:
    """The plan, or ImplausiblePlan with the reason (see `plan_problem`)."""
    problem = plan_problem(result, max_speed_mps)
    if problem:
        raise ImplausiblePlan(problem)
    return result


def plan_problem(result: PlanResult, max_speed_mps: float) -> str | None:
    """Why a plan must not be published (non-finite or physically implausible), or None.

    The trajectory starts at the ego (the origin of the t0 frame); no step may cover more than
    max_speed_mps allows in one waypoint interval.
    """
    xy = np.asarray(result.trajectory_xy, dtype=np.float64)
    controls = np.asarray(result.controls, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) == 0:
        return f"trajectory has shape {xy.shape}, expected [N, 2]"
    if not np.isfinite(xy).all() or not np.isfinite(controls).all():
        return "trajectory or controls not finite"
    steps = np.hypot(*np.diff(np.vstack([[0.0, 0.0], xy]), axis=0).T)
    limit = max_speed_mps * STEP_SECONDS * 1.01
    if steps.max() > limit:
        i = int(steps.argmax())
        return (f"waypoint {i + 1} is {steps[i]:.3g} m from the previous one (> {limit:.3g} m at "
                f"max_speed_mps {max_speed_mps:g})")
    return None


def self_test(planner: Planner, cameras: int, max_speed_mps: float) -> float:
    """Plan one synthetic scene (grey frames from `cameras` cameras, a car at rest) and refuse a
    model whose outputs are not finite or implausible (e.g. weights holding NaN). Returns the
    plan's milliseconds; it also warms the engines up."""
    from .scenarios.scene import NUM_FRAMES

    vision = planner.target.config.vision
    images = np.full((cameras, NUM_FRAMES, vision.image_height, vision.image_width, 3), 128, np.uint8)
    history = history_bins(np.zeros((HISTORY_STEPS + 1, 3)))
    start = time.perf_counter()
    try:
        result = planner.plan(images, history, 0.0)
    except Exception as error:  # noqa: BLE001 - e.g. a runtime error of the backend: one clear line
        raise ModelLoadError(f"start-up self-test plan failed: {type(error).__name__}: {error}") from None
    elapsed_ms = (time.perf_counter() - start) * 1e3
    problem = plan_problem(result, max_speed_mps)
    if problem is None and not all(math.isfinite(float(v)) for v in result.timings_ms.values()):
        problem = "timings not finite"
    if problem:
        raise ModelLoadError(f"start-up self-test plan failed: {problem} (are the weights corrupt?)")
    return elapsed_ms
