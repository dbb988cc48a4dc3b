"""A contact sheet: per scene, the t0 frame of each camera, a bird's-eye view and the CoC."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..scenarios.events import BUILDERS  # noqa: E402
from ..scenarios.scene import make_scene  # noqa: E402


def draw_contact_sheet(out: str, seed: int = 3, rows: int = 8) -> None:
    """One row per scene, cycling through the event catalogue so every kind shows up."""
    events = list(BUILDERS)
    fig, axes = plt.subplots(rows, 3, figsize=(13, 2.3 * rows), gridspec_kw={"width_ratios": [2, 2, 1.2]})
    for row in range(rows):
        scene = make_scene(seed * 1000 + row, event=events[(seed + row) % len(events)])
        for col in range(2):
            axes[row, col].imshow(scene.images[col, -1][:, :, ::-1], interpolation="nearest")
            axes[row, col].set_axis_off()
        axes[row, 0].set_title(f"{scene.event} / {scene.primary}", fontsize=8, loc="left")
        bev = axes[row, 2]
        bev.plot(-scene.history_xyz[:, 1], scene.history_xyz[:, 0], "k.-", ms=2, label="history")
        bev.plot(-scene.future_xy[:, 1], scene.future_xy[:, 0], "g.-", ms=2, label="future")
        bev.set_aspect("equal", adjustable="datalim")
        bev.tick_params(labelsize=6)
        axes[row, 1].set_title(_wrap(scene.coc, 95), fontsize=7, loc="left")
    axes[0, 2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


