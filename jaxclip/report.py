"""Human-readable summaries of a built (abstract) run: parameter counts, mesh, memory."""

from __future__ import annotations

from jaxclip import mesh as mesh_lib
from jaxclip.models.two_tower import count_params


def param_counts(params: dict) -> dict[str, int]:
    """Parameters per top-level part (image, text, ...), scalars grouped under 'other'."""
    counts: dict[str, int] = {}
    for name, sub in params.items():
        key = name if isinstance(sub, dict) else "other"
        counts[key] = counts.get(key, 0) + count_params(sub)
    counts["total"] = count_params(params)
    return counts


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def dry_run_report(setup) -> str:
    state, shardings = setup.abstract_state, setup.state_shardings
    lines = [f"config: {setup.cfg.name}", f"mesh: {mesh_lib.describe(setup.mesh)}", "parameters:"]
    for name, n in param_counts(state["params"]).items():
        lines.append(f"  {name:<8}{n:>15,}")
    p_bytes = mesh_lib.bytes_per_device(state["params"], shardings["params"])
    o_bytes = mesh_lib.bytes_per_device(state["opt_state"], shardings["opt_state"])
    lines += [
        "per-device bytes (largest device):",
        f"  params     {_gib(p_bytes)}",
        f"  opt state  {_gib(o_bytes)}",
        f"  total      {_gib(p_bytes + o_bytes)}",
        f"global batch: {setup.cfg.data.batch_size} ({setup.kind.name}), per example:",
    ]
    for name, field in setup.batch_fields.items():
        lines.append(f"  {name:<9}{str(field.shape):<16}{field.dtype}")
    return "\n".join(lines)
