"""Ray Tune sweeps: the §7b ridge baseline's cross-validation, and pipeline arms (§5 best-of-N).

One Tune trial scores one cell: a direction (A->B or B->A), a model kind, a training-set size
and one hyper-parameter setting, by k-fold CV (:func:`nla_ray.analysis.ridge.cv_fold_scores`)
on a document-grouped subset of the training slice. The arithmetic lives in
:mod:`nla_ray.analysis.ridge`; this module only fans the cells out and collects a table.

    rows, best = ridge_sweep(X, Y, groups, None, kinds=("linear", "rbf"),
                             n_trains=(1000, 5000, 20000), directions=("a_to_b", "b_to_a"))
    best[("a_to_b", "rbf", 5000)]["params"]  # -> settings for ridge.learning_curve_rows

The paired arrays travel to the trials once, through the object store (``tune.with_parameters``),
not inside each trial's config. Each trial reports its wall-clock ``t_start`` / ``t_end`` and
its process id, so a caller can see how trials were spread over time and workers.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from nla_ray.analysis import ridge

__all__ = ["DIRECTIONS", "sweep_cells", "ridge_sweep", "best_configs", "stage_sweep"]

# a_to_b fits A's residual -> B's residual; b_to_a swaps the two arrays.
DIRECTIONS = ("a_to_b", "b_to_a")
BEST_KEYS = ("direction", "kind", "n_train")


def sweep_cells(kinds: Sequence[str], n_trains: Sequence[int], directions: Sequence[str],
                grid: Optional[Mapping[str, Sequence[Mapping[str, Any]]]] = None) -> list[dict]:
    """Every (direction, kind, n_train, params) cell of a sweep, one Tune trial each.

    ``grid`` maps a kind to its list of settings; a kind it does not name (or ``grid=None``)
    gets :func:`nla_ray.analysis.ridge.param_grid`'s defaults.
    """
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"unknown direction {d!r}; expected one of {DIRECTIONS}")
    cells = []
    for direction in directions:
        for kind in kinds:
            settings = (grid or {}).get(kind) or ridge.param_grid(kind)
            for n_train in n_trains:
                for params in settings:
                    cells.append({"direction": direction, "kind": kind, "n_train": int(n_train),
                                  "params": dict(params)})
    return cells


def _cv_trial(config: dict, *, X: np.ndarray, Y: np.ndarray, groups: Optional[np.ndarray],
              k: int, seed: int, scale: Any, cpus: int) -> None:
    """Tune function trainable: CV-score one cell and report it once."""
    from ray import tune
    from threadpoolctl import threadpool_limits

    t_start = time.time()
    cell = config["cell"]
    src, dst = (X, Y) if cell["direction"] == "a_to_b" else (Y, X)
    idx = ridge.train_subset(src.shape[0], cell["n_train"], groups, seed)
    # BLAS would otherwise start one thread per core in every concurrent trial and oversubscribe
    # the node; a trial gets as many threads as the CPUs Tune reserved for it.
    with threadpool_limits(limits=cpus):
        folds = ridge.cv_fold_scores(src[idx], dst[idx], cell["kind"], cell["params"], k=k,
                                     seed=seed, groups=None if groups is None else groups[idx],
                                     scale=scale)
    tune.report({"cv_fve": float(np.mean(folds)), "cv_fve_std": float(np.std(folds)),
                 "cv_fve_min": float(np.min(folds)), "n_train_used": int(len(idx)),
                 "t_start": t_start, "t_end": time.time(), "pid": os.getpid()})


def _start_ray(cpus_needed: int, address: Optional[str]) -> bool:
    """Make sure Ray is up; True when this call started it (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        # A local node with at least the CPUs the concurrent trials reserve; more logical CPUs
        # than cores only time-share them.
        # address="local": a fresh instance even when a `ray start` cluster runs on this machine
        # (ray.init would join it and refuse num_cpus); pass an address to join one.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus_needed), include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False)
    return True


def _trial_row(result: Any) -> dict:
    """One table row from a Tune ``Result``: the cell, its flattened params and its metrics."""
    cell = result.config["cell"]
    m = result.metrics or {}
    row = {"trial_id": m.get("trial_id"), "direction": cell["direction"], "kind": cell["kind"],
           "n_train": cell["n_train"], "params": dict(cell["params"]), **cell["params"]}
    for key in ("cv_fve", "cv_fve_std", "cv_fve_min", "n_train_used", "t_start", "t_end", "pid"):
        row[key] = m.get(key, math.nan)
    row["error"] = None if result.error is None else repr(result.error)
    return row


def ridge_sweep(X: Any, Y: Any, groups: Optional[Any] = None,
                grid: Optional[Mapping[str, Sequence[Mapping[str, Any]]]] = None, *,
                kinds: Sequence[str] = ridge.KINDS,
                n_trains: Sequence[int] = (1000, 5000, 20000),
                directions: Sequence[str] = ("a_to_b",), k: int = 5, seed: int = 0,
                scale: Any = "sqrt_d_model", cpus_per_trial: int = 1,
                max_concurrent: Optional[int] = None, storage_path: Optional[str] = None,
                name: str = "ridge_cv", address: Optional[str] = None,
                verbose: int = 0) -> tuple[list[dict], dict]:
    """Cross-validate every cell of the sweep as one Tune trial; ``(rows, best)``.

    ``X`` / ``Y``: paired rows of family A and family B (the training slice only: held-out rows
    must not be here). ``groups``: document id per row, for grouped subsets and folds.
    ``grid``: settings per kind (see :func:`sweep_cells`). Each trial reserves
    ``cpus_per_trial`` CPUs; ``max_concurrent`` caps simultaneous trials (None: as many as the
    cluster's CPUs allow). Uses the caller's Ray if initialised, else starts a local one (or
    joins ``address`` / ``RAY_ADDRESS``) and shuts it down afterwards. Tune's files go under
    ``storage_path/name`` (default: a fresh temporary directory), never ``~/ray_results``.

    ``rows``: one dict per trial with ``direction``, ``kind``, ``n_train`` (requested),
    ``n_train_used``, ``params`` (and each param as its own column), ``cv_fve`` (mean held-out
    FVE over folds), ``cv_fve_std``, ``t_start`` / ``t_end`` (epoch seconds), ``pid``,
    ``trial_id`` and ``error`` (None, or the failure after Tune's retries). ``best``:
    :func:`best_configs` of ``rows``.
    """
    import ray
    from ray import tune

    X = np.ascontiguousarray(ridge.unit(X))
    Y = np.ascontiguousarray(ridge.unit(Y))
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}")
    g = None if groups is None else np.asarray(groups)
    cells = sweep_cells(kinds, n_trains, directions, grid)
    storage = Path(storage_path or tempfile.mkdtemp(prefix="nla_ray_tune_")).resolve()
    storage.mkdir(parents=True, exist_ok=True)

    # Without a cap, a fresh local node gets the machine's cores and Tune fills them.
    started = _start_ray(cpus_per_trial * min(max_concurrent or 1, len(cells)), address)
    try:
        have = ray.cluster_resources().get("CPU", 0)
        if have < cpus_per_trial:
            # Tune would wait forever for a placement that can never be made.
            raise ValueError(f"cluster has {have} CPUs, a trial needs {cpus_per_trial}")
        # Unit rows once here, not per trial: the trials receive the normalised arrays via the
        # object store (with_parameters puts each array there once for all trials).
        trainable = tune.with_resources(
            tune.with_parameters(_cv_trial, X=X, Y=Y, groups=g, k=k, seed=seed, scale=scale,
                                 cpus=cpus_per_trial),
            {"cpu": cpus_per_trial})
        tuner = tune.Tuner(
            trainable,
            param_space={"cell": tune.grid_search(cells)},
            tune_config=tune.TuneConfig(metric="cv_fve", mode="max",
                                        max_concurrent_trials=max_concurrent,
                                        trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
            run_config=tune.RunConfig(name=name, storage_path=str(storage),
                                      failure_config=tune.FailureConfig(max_failures=2),
                                      verbose=verbose),
        )
        result_grid = tuner.fit()
        rows = [_trial_row(r) for r in result_grid]
    finally:
        if started:
            ray.shutdown()
    return rows, best_configs(rows)


def best_configs(results: Sequence[Mapping[str, Any]],
                 keys: Sequence[str] = BEST_KEYS) -> dict:
    """The highest-``cv_fve`` row per ``keys`` (default ``(direction, kind, n_train)``).

    Direction is part of the key because A->B and B->A are different regressions whose best
    settings need not agree. Rows that failed (NaN or missing ``cv_fve``) never win; a group
    whose trials all failed is absent. Ties keep the first row in ``results`` order.
    """
    best: dict = {}
    for row in results:
        score = row.get("cv_fve")
        if score is None or not math.isfinite(score):
            continue
        key = tuple(row[k] for k in keys)
        if key not in best or score > best[key]["cv_fve"]:
            best[key] = dict(row)
    return best


# -------------------------------------------------------------------------------------------
# a pipeline per trial: sweeps over AV settings (best-of-N temperatures)


def _stages_trial(config: dict, *, arms: Mapping[str, dict], source: Any, out_root: str, fingerprint: dict,
                  score: Any, score_kwargs: dict) -> None:
    """Tune function trainable: run one arm's stages over the stored rows (resumable parts under
    ``out_root/rows/<arm>``), then report ``score(rows, **score_kwargs)``."""
    from ray import tune

    from nla_ray.runtime import pipeline
    from nla_ray.runtime.rows import RowParts, final_table

    t_start = time.time()
    arm = arms[config["arm"]]
    parts = RowParts(Path(out_root) / "rows" / config["arm"])
    fp = {"stages": pipeline.stages_fingerprint(arm["stages"]), **fingerprint}
    pipeline.run(arm["stages"], source=source, parts=parts, fingerprint=fp, per_position=arm["per_position"],
                 log=lambda m: None)
    rows = final_table(parts.read(), docs=list(dict.fromkeys(source.column("doc_id").to_pylist())))
    tune.report({**score(rows, **score_kwargs), "t_start": t_start, "t_end": time.time(), "pid": os.getpid()})


_TUNE_BOOKKEEPING = ("time_", "timestamp", "training_iteration", "date", "hostname", "node_ip", "done",
                     "trial_id", "iterations_since", "config", "checkpoint_dir_name", "should_checkpoint")


def stage_sweep(arms: Mapping[str, dict], source: Any, out_root: str | Path, score: Any, *,
                score_kwargs: Optional[dict] = None, fingerprint: Optional[dict] = None,
                cpus_per_trial: float = 0.25, max_concurrent: Optional[int] = None, name: str = "sweep",
                address: Optional[str] = None) -> list[dict]:
    """One Tune trial per arm, each streaming ``source`` (stored rows) through its own stage list
    (actor pools of its own, on the same cluster) and reporting ``score`` of its rows.

    ``arms``: name -> ``{"stages": [StageSpec...], "per_position": int, "setting": {...}}``.
    ``score``: an importable function ``(rows, **score_kwargs) -> dict`` of numbers. A trial
    reserves only ``cpus_per_trial`` for its driver loop; its pools reserve what their configs
    say, so concurrent trials share the cluster the way the pools' resources allow. Rows go to
    ``out_root/rows/<arm>`` and resume like any job's, so a trial Tune retries continues from its
    finished documents. Returns one row per arm (in ``arms`` order): setting, metrics, error.
    """
    import ray
    from ray import tune

    from nla_ray.runtime.pipeline import init_ray

    # Absolute: Tune runs each trial in its own working directory, where a relative path would
    # put the rows (and their resume) somewhere else.
    out_root = Path(out_root).resolve()
    storage = out_root / "tune"
    storage.mkdir(parents=True, exist_ok=True)
    # What one trial holds at once: its pools' actors plus its own driver loop.
    need = {"CPU": max(cpus_per_trial + sum(s.pool.num_cpus * max(1, s.pool.concurrency) for s in a["stages"])
                       for a in arms.values()),
            "GPU": max(sum(s.pool.num_gpus * max(1, s.pool.concurrency) for s in a["stages"]) for a in arms.values())}
    local = not (address or os.environ.get("RAY_ADDRESS"))
    if ray.is_initialized() and local and ray.cluster_resources().get("CPU", 0) < need["CPU"]:
        # A local instance started for an earlier stage (e.g. extraction) with fewer logical CPUs
        # than one trial's pools: restart it sized for the sweep, or the pools would wait forever.
        ray.shutdown()
    started = not ray.is_initialized()
    init_ray(address, [s for a in arms.values() for s in a["stages"]])
    have = ray.cluster_resources()
    fit = min(int(have.get(r, 0) // n) for r, n in need.items() if n > 0)
    if fit < 1:
        raise ValueError(f"one trial needs {need} but the cluster has CPU={have.get('CPU', 0)}, "
                         f"GPU={have.get('GPU', 0)}: lower the pools' num_cpus/num_gpus or add nodes")
    # More concurrent trials than fit would hold pools that wait on each other's resources.
    max_concurrent = min(max_concurrent or fit, fit)
    try:
        trainable = tune.with_resources(
            tune.with_parameters(_stages_trial, arms=dict(arms), source=source, out_root=str(out_root),
                                 fingerprint=dict(fingerprint or {}), score=score, score_kwargs=dict(score_kwargs or {})),
            {"cpu": cpus_per_trial})
        tuner = tune.Tuner(trainable, param_space={"arm": tune.grid_search(list(arms))},
                           tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent,
                                                       trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
                           run_config=tune.RunConfig(name=name, storage_path=str(storage),
                                                     failure_config=tune.FailureConfig(max_failures=2), verbose=0))
        out = []
        for r in tuner.fit():
            arm = r.config["arm"]
            metrics = {k: v for k, v in (r.metrics or {}).items() if not k.startswith(_TUNE_BOOKKEEPING)}
            out.append({"arm": arm, **arms[arm].get("setting", {}), **metrics,
                        "error": None if r.error is None else repr(r.error)})
    finally:
        if started:
            ray.shutdown()
    return sorted(out, key=lambda row: list(arms).index(row["arm"]))
