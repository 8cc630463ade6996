"""§7c: drawing the self-drift of the AV's and AR's residual streams from the base model's (Fig. 4).
The arithmetic is metrics.nmse / metrics.cosine on aligned rows; this module only draws."""

from __future__ import annotations

import numpy as np

__all__ = ["figure"]


def figure(drift: dict, ref: float, path, title: str):
    from nla_ray.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    roles = list(drift)
    vals = [drift[r]["nmse"] for r in roles]
    err = np.array([[drift[r]["nmse"] - drift[r]["nmse_ci95"][0], drift[r]["nmse_ci95"][1] - drift[r]["nmse"]]
                    for r in roles]).T
    ax.bar(roles, vals, yerr=err, capsize=4, color=["#dd8452", "#4c72b0"])
    ax.axhline(ref, ls="--", color="gray", label=f"NLA reconstruction NMSE {ref:.3f}")
    ax.set_ylabel("NMSE to the base model's stream")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
