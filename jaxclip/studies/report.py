"""results.json, report.md and plots of a finished study; the table is built from the JSON.

`table_markdown(results_json)` is the one function that turns numbers into the report's
table, so a test can rebuild it from results.json and compare it with report.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

START, END = "<!-- results table -->", "<!-- end results table -->"


def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return (
            f"{value:.4g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.4f}"
        )
    return str(value)


def table_markdown(data: dict) -> str:
    columns = data["columns"]
    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in data["rows"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def table_from_report(text: str) -> str:
    """The table section of a report.md, as written."""
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def _verdict_lines(verdict: dict, indent: str = "") -> list[str]:
    lines = [f"{indent}- **{verdict['label']}** — rule: {verdict['rule']}."]
    if "effect" in verdict:
        lines.append(
            f"{indent}  effect {fmt(verdict['effect'])}, seed noise {fmt(verdict['seed_noise'])}, "
            f"threshold {fmt(verdict['threshold'])}"
        )
    for name, part in verdict.get("parts", {}).items():
        lines.append(f"{indent}- {name}:")
        lines.extend(_verdict_lines(part, indent + "  "))
    return lines


def _plot(out: Path, name: str, title: str, xlabel: str, ylabel: str, series: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=100)
    for label, (xs, ys) in series.items():
        if all(isinstance(x, str) for x in xs):
            ax.plot(range(len(xs)), ys, marker="o", label=label)
            ax.set_xticks(range(len(xs)), xs, rotation=20, fontsize=8)
        else:
            ax.plot(xs, ys, marker="o", label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / name)
    plt.close(fig)
    return name


def _finite(value):
    """NaN (a metric that could not be computed) is written as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _values(values) -> str:
    """The distinct values of a setting over a study's runs, e.g. "400" or "200 / 400"."""
    return " / ".join(str(v) for v in sorted(set(values), key=str))


def write(out: Path, study, ctx, results, wall_s: float, machine: dict) -> dict:
    """Writes out/results.json, out/report.md and the plots; returns the JSON's content."""
    out.mkdir(parents=True, exist_ok=True)
    runs = {
        name: {
            "overrides": {k: str(v) for k, v in run.overrides.items()},
            "seed": int(run.cfg.seed),
            "wall_s": round(run.wall_s, 1),
            "final_train_loss": run.train_results.get("train/loss"),
        }
        for name, run in ctx.runs.items()
    }
    cfgs = [run.cfg for run in ctx.runs.values()] or [ctx.config({}, ctx.seed)]
    data = {
        "study": study.NAME,
        "claim": study.CLAIM,
        "quick": ctx.quick,
        "seed": ctx.seed,
        "command": f"python launch/study.py --study {study.NAME}"
        + (" --quick" if ctx.quick else "")
        + (f" --seed {ctx.seed}" if ctx.seed else ""),
        "wall_s": round(wall_s, 1),
        "machine": machine,
        "setup": {
            "base_config": "demo",
            "image_variant": _values(c.model.image.variant for c in cfgs),
            "image_size": _values(c.data.image_size for c in cfgs),
            "batch_size": _values(c.data.batch_size for c in cfgs),
            "steps": _values(c.train.steps for c in cfgs),
            "eval_examples": _values(c.eval.num_examples for c in cfgs),
            "tasks": list(ctx.tasks),
            "missing_evaluators": list(ctx.missing),
        },
        "runs": runs,
        "columns": list(results.columns),
        "rows": _finite(results.rows),
        "verdict": _finite(results.verdict),
        "notes": list(results.notes),
    }
    (out / "results.json").write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    plots = [_plot(out, *p) for p in results.plots]
    (out / "report.md").write_text(render(data, plots))
    return data


def render(data: dict, plots: list[str]) -> str:
    setup, m = data["setup"], data["machine"]
    nan = float("nan")
    lines = [
        f"# Study: {data['study']}",
        "",
        f"Generated by `{data['command']}` (do not edit: rerun the command).",
        "",
        "## Claim",
        "",
        data["claim"],
        "",
        "## Setup",
        "",
        f"- Base config `{setup['base_config']}` with image tower `{setup['image_variant']}` at "
        f"{setup['image_size']} px, batch {setup['batch_size']}, {setup['steps']} steps"
        f"{' (quick mode)' if data['quick'] else ''}; base seed {data['seed']}.",
        f"- Evaluation: {setup['eval_examples']} examples per set; tasks "
        f"{', '.join(f'`{t}`' for t in setup['tasks']) or 'none'}.",
        f"- Machine: nproc={m['nproc']}, {m['devices']}, jax {m['jax']}, {m['platform']}.",
        f"- Wall time of the whole study: {data['wall_s']:.0f} s (1-minute load average "
        f"{m.get('load_start', nan):.1f} at the start, {m.get('load_end', nan):.1f} at the end; "
        "above the core count, other processes shared the CPU).",
    ]
    if setup["missing_evaluators"]:
        lines.append(
            f"- Evaluators not available on this checkout (their metrics are absent): "
            f"{', '.join(f'`{t}`' for t in setup['missing_evaluators'])}."
        )
    lines += ["", "| run | seed | wall s | overrides |", "|---|---|---|---|"]
    for name, run in data["runs"].items():
        changes = ", ".join(f"`{k}={v}`" for k, v in run["overrides"].items()) or "(base)"
        lines.append(f"| {name} | {run['seed']} | {run['wall_s']:.0f} | {changes} |")
    lines += ["", "## Results", "", START, table_markdown(data), END, ""]
    lines += [f"- {note}" for note in data["notes"]]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", "## Verdict", "", *_verdict_lines(data["verdict"]), ""]
    return "\n".join(lines)
