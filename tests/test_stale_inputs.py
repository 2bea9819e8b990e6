"""Stale results are never reused silently: every artifact's fingerprint covers every input that
shaped it, and it is checked before any "already done" skip.

- Stage 6: a changed ``laplace.*`` value stops ``fit_laplace.py`` although the posterior is fitted.
- Stage 5: the variance network and the fusion module record the md5s of the files they train on
  (head, head Laplace state, variance network, SAM checkpoint), so a refit upstream stops them.
- Stage 7: the evaluation fingerprints the fusion module and the Laplace state it reads.
"""

from __future__ import annotations

import argparse
import json

import pytest

from modules.core.config import load_config
from modules.core.fileio import atomic_write_json
from modules.core.stage import StageContext, StageInputsChanged
from modules.laplace import posterior as lp


def make_ctx(tmp_path, overrides=(), force=False):
    cfg = load_config(None, [f"data.project_root={tmp_path / 'proj'}", *overrides])
    out = tmp_path / "proj" / "laplace" / "head" / "run_x"
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(name="fit_laplace", cfg=cfg, args=argparse.Namespace(force=force), output_dir=out)


def write_fitted_posterior(folder, checkpoint_md5="abc"):
    for name in lp.ARTIFACTS:
        (folder / name).write_text("x")
    atomic_write_json(folder / lp.META_FILE, {"source_checkpoint_md5": checkpoint_md5, "prior_precision": 1.0})


# --------------------------------------------------------------------------- unit level


def test_fingerprint_is_checked_before_the_already_fitted_skip(tmp_path):
    upstream = {"head_checkpoint_md5": "abc"}
    ctx = make_ctx(tmp_path)
    assert lp.already_fitted(ctx, "best.pt", "abc", upstream) is False  # first fit
    write_fitted_posterior(ctx.output_dir)
    assert lp.already_fitted(make_ctx(tmp_path), "best.pt", "abc", upstream) is True  # unchanged: skipped
    fingerprint = json.loads((ctx.output_dir / ".stage.json").read_text())
    assert set(fingerprint) == {"stage", "config", "upstream"} and set(fingerprint["config"]) == {"laplace"}
    assert fingerprint["upstream"] == upstream

    changed = make_ctx(tmp_path, ["laplace.prior_precision_grid=[0.5, 5.0]"])
    with pytest.raises(StageInputsChanged, match=r"laplace\.prior_precision_grid.*--force"):
        lp.already_fitted(changed, "best.pt", "abc", upstream)
    with pytest.raises(StageInputsChanged, match=r"upstream head_checkpoint_md5"):
        lp.already_fitted(make_ctx(tmp_path), "best.pt", "other", {"head_checkpoint_md5": "other"})

    # --force refits: the old posterior is gone before the fit starts, so a refit killed half-way
    # cannot leave it looking complete under the new fingerprint.
    forced = make_ctx(tmp_path, ["laplace.prior_precision_grid=[0.5, 5.0]"], force=True)
    assert lp.already_fitted(forced, "best.pt", "abc", upstream) is False
    assert not any((ctx.output_dir / name).exists() for name in lp.ARTIFACTS)
    write_fitted_posterior(ctx.output_dir)
    assert lp.already_fitted(make_ctx(tmp_path, ["laplace.prior_precision_grid=[0.5, 5.0]"]), "best.pt", "abc",
                             upstream) is True
