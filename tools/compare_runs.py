#!/usr/bin/env python
"""Compare MLflow runs side by side: a table in the terminal, a CSV, and PNG plots.

    python tools/compare_runs.py [--experiment lsa_demo] [--runs ID ...] [--filter "params.model.name = 'lsa_tiny'"]
                                 [--metric val/top1 ...] [--param optim.lr] [--out DIR] [--uri URI]

The table has one row per run: its name, the params that differ between the runs (all of
them with --all-params), the best and the last value of each chosen metric, throughput,
duration and status. Best is the lowest value for loss, error, time and memory metrics and
the highest for the rest (--mode min|max decides otherwise); the curves plot draws the best
runs (--plot-runs). Runs come from one search; metric histories are fetched only where a
best value needs them (top-1 logs its own best-so-far) and for the runs plotted.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYSTEM_PREFIXES = ("params.tracking.", "params.train.output_dir", "params.data.root", "params.train.name")
# metrics where lower is better (loss, error, time, memory); the others (top-1, throughput, MFU) higher
LOWER_IS_BETTER = ("loss", "error", "err_", "_ms", "eta", "mem", "time", "first_step_s", "duration")


def direction(metric: str, mode: str = "auto") -> str:
    """'min' or 'max': which end of a metric is its best (`mode` overrides the guess by name)."""
    if mode != "auto":
        return mode
    return "min" if any(word in metric.lower() for word in LOWER_IS_BETTER) else "max"


def resolve_uri(uri: str | None) -> str:
    from lsa_dist.config import RunConfig
    from lsa_dist.tracking import tracking_uri

    cfg = RunConfig()
    cfg.tracking.uri = uri or ""
    return tracking_uri(cfg)


def search(uri: str, experiment: str, run_ids: list[str], filter_string: str) -> Any:
    """All matching runs as a DataFrame, in one paged search."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise SystemExit(
            f"error: no experiment {experiment!r} at {uri}; experiments there: {', '.join(names) or 'none'}"
        )
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs([found.experiment_id], filter_string=filter_string, max_results=100_000)
    if run_ids:
        runs = runs[runs["run_id"].isin(run_ids)]
        missing = sorted(set(run_ids) - set(runs["run_id"]))
        if missing:
            raise SystemExit(f"error: run(s) {', '.join(missing)} not found in experiment {experiment!r}")
    if runs.empty:
        raise SystemExit("error: no runs match")
    return runs.reset_index(drop=True)


def differing_params(runs: Any, show_all: bool) -> list[str]:
    cols = [c for c in runs.columns if c.startswith("params.") and not c.startswith(SYSTEM_PREFIXES)]
    if show_all:
        return sorted(cols)
    return sorted(c for c in cols if runs[c].astype(str).nunique(dropna=False) > 1)


def best_values(uri: str, runs: Any, metric: str, goal: str) -> list[float]:
    """Each run's best value of `metric`: its logged best-so-far (`<metric>_best`, kept for
    top-1) when that is the direction asked for, else the min or max of its history."""
    from mlflow import MlflowClient

    logged = runs.get(f"metrics.{metric}_best")
    if logged is not None and goal == "max" and logged.notna().all():
        return list(logged)
    client, out = MlflowClient(uri), []
    for run_id in runs["run_id"]:
        values = [m.value for m in client.get_metric_history(run_id, metric) if not math.isnan(m.value)]
        out.append((min(values) if goal == "min" else max(values)) if values else math.nan)
    return out


def build_table(runs: Any, metrics: list[str], params: list[str], uri: str, mode: str = "auto") -> Any:
    import pandas as pd

    table = pd.DataFrame(
        {"run": runs.get("tags.mlflow.runName", runs["run_id"]).fillna(runs["run_id"]), "run_id": runs["run_id"]}
    )
    for col in params:
        table[col[len("params.") :]] = runs[col]
    for metric in metrics:
        last = runs.get(f"metrics.{metric}")
        table[f"{metric} last"] = last if last is not None else math.nan
        has_values = last is not None and last.notna().any()
        table[f"{metric} best"] = best_values(uri, runs, metric, direction(metric, mode)) if has_values else math.nan
    table["images/s"] = runs.get("metrics.train/images_per_s", math.nan)
    start, end = runs["start_time"], runs["end_time"]
    table["duration min"] = ((end - start).dt.total_seconds() / 60).round(2)
    table["status"] = runs["status"]
    return table


def plot_curves(uri: str, table: Any, metrics: list[str], out: Path, max_runs: int, mode: str = "auto") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    key = f"{metrics[0]} best"
    ascending = direction(metrics[0], mode) == "min"
    chosen = table.sort_values(key, ascending=ascending, na_position="last").head(max_runs)
    print(f"curves of the {len(chosen)} best runs by {key}: {', '.join(chosen['run'])}")
    curves = list(dict.fromkeys([*metrics, "train/loss"]))
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], curves):
        for _, row in chosen.iterrows():
            history = sorted(client.get_metric_history(row["run_id"], metric), key=lambda m: m.step)
            if history:
                ax.plot(
                    [m.step for m in history],
                    [m.value for m in history],
                    label=row["run"],
                    marker="." if len(history) < 30 else None,
                )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="run")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_param(table: Any, metric: str, param: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    values = pd.to_numeric(table[param], errors="coerce")
    numeric = values.notna().all()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    y = table[f"{metric} best"]
    if numeric:
        order = values.argsort()
        ax.plot(values.iloc[order], y.iloc[order], marker="o")
        if values.min() > 0 and values.max() / values.min() > 20:
            ax.set_xscale("log")
        for x, v, name in zip(values, y, table["run"]):
            ax.annotate(name, (x, v), fontsize=7, xytext=(3, 3), textcoords="offset points")
    else:
        ax.bar(table[param].astype(str) + "\n" + table["run"], y)
    ax.set_xlabel(param)
    ax.set_ylabel(f"{metric} (best)")
    ax.set_title(f"{metric} against {param}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"{metric.replace('/', '_')}_vs_{param.replace('/', '_')}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--experiment", default="lsa_demo")
    parser.add_argument("--runs", nargs="*", default=[], help="run ids (default: every run of the experiment)")
    parser.add_argument("--filter", default="", help="an MLflow search filter, e.g. \"params.model.name = 'lsa_tiny'\"")
    parser.add_argument(
        "--metric", action="append", default=None, help="metric(s) to compare (default val/top1, val/loss)"
    )
    parser.add_argument(
        "--param", default=None, help="param for the final-metric chart (default: the first differing one)"
    )
    parser.add_argument(
        "--mode",
        choices=["auto", "min", "max"],
        default="auto",
        help="which end of the metrics is best (auto: loss, error, time and memory lowest, the rest highest)",
    )
    parser.add_argument("--all-params", action="store_true", help="show every param, not only those that differ")
    parser.add_argument("--plot-runs", type=int, default=10, help="runs drawn in the curves plot, best first")
    parser.add_argument("--out", type=Path, default=None, help="write comparison.csv and PNG plots here")
    parser.add_argument(
        "--uri", default=None, help="MLflow tracking URI (default: as training: $MLFLOW_TRACKING_URI or ./mlflow.db)"
    )
    args = parser.parse_args(argv)
    metrics = args.metric or ["val/top1", "val/loss"]
    uri = resolve_uri(args.uri)
    start = time.perf_counter()
    runs = search(uri, args.experiment, args.runs, args.filter)
    params = differing_params(runs, args.all_params)
    table = build_table(runs, metrics, params, uri, args.mode)
    searched = time.perf_counter() - start

    import pandas as pd

    shown = table.drop(columns=["run_id"])
    with pd.option_context(
        "display.max_rows",
        500,
        "display.max_columns",
        50,
        "display.width",
        250,
        "display.float_format",
        "{:.4g}".format,
    ):
        print(shown.to_string(index=False))
    which = "all" if args.all_params else "those that differ"
    goals = ", ".join(f"{m} {'lowest' if direction(m, args.mode) == 'min' else 'highest'}" for m in metrics)
    print(f"\n{len(table)} runs from {uri} in {searched:.2f} s; params shown: {which}; best: {goals}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "comparison.csv", index=False)
        written = [args.out / "comparison.csv", plot_curves(uri, table, metrics, args.out, args.plot_runs, args.mode)]
        param = args.param or next((p[len("params.") :] for p in params), None)
        if param is not None:
            if param not in table.columns:
                table[param] = runs.get(f"params.{param}")
            written.append(plot_param(table, metrics[0], param, args.out))
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
