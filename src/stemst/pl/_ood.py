"""The out-of-distribution score of a prediction over the H&E: where the model sees tissue unlike its training data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stemst._docs import doc_params, doc_pred_key, doc_show_save
from stemst._schema import OOD_SCORE_KEY, OOD_UNS_KEY, PREDICTION_KEY, StemstDataError, get_table, section_mask
from stemst.pl._utils import draw_section, finish, grid


@doc_params(pred_key=doc_pred_key, show_save=doc_show_save)
def ood_map(
    sdata: Any,
    *,
    section: str,
    pred_key: str = PREDICTION_KEY,
    cmap: str = "coolwarm",
    vmax: float = 3.0,
    figsize: tuple[float, float] = (5.0, 5.0),
    show: bool | None = None,
    save: str | Path | None = None,
) -> Any:
    """Map each spot's out-of-distribution score (``obs['ood_score']``) over the H&E of one section.

    The colour scale is centred on 1, the threshold: about 5% of unseen spots like the training ones lie above it;
    the title gives the section's share of spots above it (``uns['stemst_ood']``).

    Parameters
    ----------
    sdata
        :class:`~spatialdata.SpatialData` with the prediction table (:func:`stemst.tl.predict`).
    section
        Section to draw.
    {pred_key}
    cmap
        Diverging colour map (blue: like the training spots; red: out of distribution).
    vmax
        Top of the colour scale (scores above are drawn at it); the bottom is 0.
    figsize
        Figure size (inches).
    {show_save}

    Returns
    -------
    The axes.

    Examples
    --------
    >>> key = stemst.tl.predict(model, sdata, sections="C6", n_samples=2, progress=False)
    >>> ax = stemst.pl.ood_map(sdata, section="C6", pred_key=key, show=False)
    >>> ax.get_title().startswith("C6: out-of-distribution score")
    True
    """
    from matplotlib.colors import TwoSlopeNorm

    pred = get_table(sdata, pred_key)
    if OOD_SCORE_KEY not in pred.obs:
        raise StemstDataError(
            f"Prediction {pred_key!r} has no obs[{OOD_SCORE_KEY!r}]: its model has no training reference (a baseline, "
            "or a model saved by an older stemst). Fit the model again and predict."
        )
    mask = section_mask(pred, section)
    if not mask.any():
        raise StemstDataError(f"Prediction {pred_key!r} has no spots in section {section!r}.")
    scores = np.minimum(pred.obs[OOD_SCORE_KEY].to_numpy(np.float64)[mask], vmax)
    fig, axes = grid(1, ncols=1, panel_size=figsize)
    ax = axes[0]
    coll = draw_section(ax, sdata, pred, section, values=scores, cmap=cmap)
    coll.set_norm(TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(vmax, 1.0 + 1e-6)))
    frac = pred.uns.get(OOD_UNS_KEY, {}).get(section, {}).get("fraction_ood", float((scores > 1).mean()))
    ax.set_title(f"{section}: out-of-distribution score ({frac:.0%} of spots > 1)")
    fig.colorbar(coll, ax=ax, shrink=0.8, label="OOD score (1 = threshold)")
    finish(fig, show, save)
    return ax
