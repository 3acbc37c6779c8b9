"""Renderers for the efficiency comparison: Markdown, JSON, a plot and an HTML fragment.

Plain functions, so `tamis/cli.py` can wire them into `tamis efficiency` and
`tamis report`:

    points = load_points(paths or None)
    result = compute_efficiency(points)
    print(efficiency_markdown(result))          # or json.dumps(efficiency_json(result))
    plot_efficiency(result, Path("efficiency.svg"))
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

from tamis.errors import TamisError
from tamis.report.efficiency import (
    BridgeEstimate,
    BridgeFit,
    EfficiencyResult,
    MethodEfficiency,
    area_methods,
    compute_efficiency,
    load_points,
    read_utf8,
)

__all__ = [
    "compute_efficiency",
    "efficiency_html_section",
    "efficiency_json",
    "efficiency_markdown",
    "load_points",
    "plot_efficiency",
    "run_efficiency",
]

GREEN, RED, GOLD, GREY = "#2e8b3a", "#c8322b", "#d4a017", "#7f7f7f"


# --------------------------------------------------------------------------- #
# Text
# --------------------------------------------------------------------------- #


def _fmt_slope(value: float) -> str:
    return "vertical" if math.isinf(value) else f"{value:.3f}"


def _pir_cell(m: MethodEfficiency) -> str:
    return f"{m.pir:.3f} (bridge)" if m.pir_estimated else f"{m.pir:.3f}"


def _sizes_cell(m: MethodEfficiency) -> str:
    flag = "" if m.sizes_confirmed else " (unconfirmed)"
    return f"{m.selected_size:,} / {m.pool_size:,}{flag}"


def _position_cell(m: MethodEfficiency) -> str:
    return "baseline (reference)" if m.is_reference and m.position == "baseline" else m.position


def ranking_rows(result: EfficiencyResult) -> list[list[str]]:
    """The ranking table as strings, one row per method, best first."""
    return [
        [
            str(m.rank),
            m.method if m.published else f"{m.method} (yours)",
            _pir_cell(m),
            f"{m.sdf:.4f}",
            f"{m.signed_distance:+.4f}",
            _position_cell(m),
            ", ".join(m.incomparable_with) or "-",
            _sizes_cell(m),
        ]
        for m in result.methods
    ]


RANKING_HEADER = ["Rank", "Method", "PIR", "SDF", "Signed distance", "Position", "Incomparable with", "Selected / pool"]


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def _bridge_sentence(fit: BridgeFit | None) -> str:
    if fit is None:
        return "No bridge could be fitted (fewer than two methods report both groups)."
    fitted = ", ".join(fit.fitted_methods)
    r2 = "n/a" if fit.r_squared is None else f"{fit.r_squared:.3f}"
    if fit.mode == "pooled":
        return (
            f"PIR = {fit.slope:.4f} x ratio {fit.intercept:+.4f} (pooled over {', '.join(fit.groups)}; "
            f"fitted on {fitted}; R^2 = {r2})"
        )
    terms = " ".join(f"{c:+.4f} x {g}" for g, c in fit.coefficients.items())
    return f"PIR = {fit.intercept:.4f} {terms} (per-group, blanks as 0; fitted on {fitted}; R^2 = {r2})"


def estimate_rows(estimates: Sequence[BridgeEstimate], alternative: Sequence[BridgeEstimate]) -> list[list[str]]:
    """Bridge estimates next to the survey's parenthesised values and the alternative bridge."""
    alt = {e.method: e for e in alternative}
    rows = []
    for e in estimates:
        other = alt.get(e.method)
        rows.append(
            [
                e.method,
                ", ".join(f"{g} {v:.3f}" for g, v in e.inputs.items()),
                f"{e.estimate:.3f}",
                "-" if e.survey_value is None else f"{e.survey_value:.3f}",
                "-" if e.difference is None else f"{e.difference:+.3f}",
                "-" if other is None else f"{other.estimate:.3f}",
            ]
        )
    return rows


ESTIMATE_HEADER = ["Method", "From", "Estimate", "Survey", "Difference", "Alternative bridge"]


def efficiency_markdown(result: EfficiencyResult) -> str:
    """Ranking table, bridge fit, estimate comparison and findings as Markdown."""
    base = result.baseline
    parts = [
        "## Efficiency ranking",
        "",
        f"Baseline through {base.reference[0]} and {base.reference[1]}: "
        f"PIR = {base.slope:.4f} x SDF {base.intercept:+.4f} "
        f"({'log10 SDF' if base.x_scale == 'log' else 'linear SDF'}). "
        "Signed distance > 0 means above the baseline (superior).",
        "",
        _md_table(RANKING_HEADER, ranking_rows(result)),
        "",
        "## Bridge (Appendix A.1)",
        "",
        _bridge_sentence(result.bridge),
        "",
        f"Alternative: {_bridge_sentence(result.alternative_bridge)}",
        "",
    ]
    if result.bridge_estimates:
        parts += [_md_table(ESTIMATE_HEADER, estimate_rows(result.bridge_estimates, result.alternative_estimates)), ""]
    if result.survey_checks:
        parts += ["## Survey conclusions", ""]
        parts += [f"- {'holds' if c.holds else 'DOES NOT HOLD'}: {c.claim} ({c.source}). {c.detail}" for c in result.survey_checks]
        parts.append("")
    if result.findings:
        parts += ["## Findings", ""] + [f"- {f}" for f in result.findings] + [""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- #
# JSON
# --------------------------------------------------------------------------- #


def _num(value: float) -> float | None:
    """JSON has no infinity: an unbounded slope becomes null."""
    return None if math.isinf(value) or math.isnan(value) else value


def _bridge_json(fit: BridgeFit | None) -> dict[str, Any] | None:
    if fit is None:
        return None
    return {
        "mode": fit.mode,
        "slope": fit.slope,
        "intercept": fit.intercept,
        "coefficients": fit.coefficients,
        "groups": list(fit.groups),
        "fitted_methods": list(fit.fitted_methods),
        "pairs": [{"method": p.method, "group": p.group, "x": p.x, "y": p.y} for p in fit.pairs],
        "r_squared": fit.r_squared,
    }


def _estimates_json(estimates: Sequence[BridgeEstimate]) -> list[dict[str, Any]]:
    return [
        {
            "method": e.method,
            "estimate": e.estimate,
            "from_groups": list(e.from_groups),
            "inputs": e.inputs,
            "ignored_groups": list(e.ignored_groups),
            "survey_value": e.survey_value,
            "difference": e.difference,
        }
        for e in estimates
    ]


def _method_json(m: MethodEfficiency) -> dict[str, Any]:
    area = m.infeasible
    return {
        "rank": m.rank,
        "method": m.method,
        "sem": m.sem,
        "pir": m.pir,
        "pir_estimated": m.pir_estimated,
        "selected_size": m.selected_size,
        "pool_size": m.pool_size,
        "sdf": m.sdf,
        "x": m.x,
        "vertical_gap": m.vertical_gap,
        "signed_distance": m.signed_distance,
        "position": m.position,
        "incomparable_with": list(m.incomparable_with),
        "sizes_confirmed": m.sizes_confirmed,
        "is_reference": m.is_reference,
        "published": m.published,
        "infeasible_area": {
            "slope_low": _num(area.slope_low),
            "slope_high": _num(area.slope_high),
            "slope_high_unbounded": math.isinf(area.slope_high),
            "polygons": [[list(v) for v in poly] for poly in area.polygons],
        },
    }


def efficiency_json(result: EfficiencyResult) -> dict[str, Any]:
    """The whole result as plain JSON-serialisable data."""
    base = result.baseline
    return {
        "reference": list(base.reference),
        "anchor": result.anchor,
        "x_scale": base.x_scale,
        "baseline": {"slope": base.slope, "intercept": base.intercept, "theta_degrees": math.degrees(base.theta)},
        "bridge": _bridge_json(result.bridge),
        "bridge_estimates": _estimates_json(result.bridge_estimates),
        "alternative_bridge": _bridge_json(result.alternative_bridge),
        "alternative_estimates": _estimates_json(result.alternative_estimates),
        "group_means": result.group_means,
        "ranking": result.ranking,
        "methods": [_method_json(m) for m in result.methods],
        "incomparable_pairs": [{"inside": a, "area_of": b} for a, b in result.incomparable_pairs],
        "survey_checks": [
            {"claim": c.claim, "source": c.source, "holds": c.holds, "detail": c.detail} for c in result.survey_checks
        ],
        "discrepancies": [c.claim for c in result.discrepancies],
        "findings": list(result.findings),
        "excluded": list(result.excluded),
        "bounds": list(result.bounds),
    }


# --------------------------------------------------------------------------- #
# Plot
# --------------------------------------------------------------------------- #


def _overlap(a: Any, b: Any) -> float:
    """Overlapping area of two display-space boxes (0 when apart)."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


# Candidate label offsets in points, nearest first: a tiny greedy label-repel.
_OFFSETS = [
    (dx * r, dy * r)
    for r in (1.0, 2.2, 3.6)
    for dx, dy in ((7, 5), (7, -11), (-7, 5), (-7, -11), (0, 9), (0, -15), (11, -3), (-11, -3))
]
# Where a user's star moves (points) when it would cover, or hide under, another marker.
_NUDGES = [(dx * r, dy * r) for r in (1.0, 1.8, 2.6) for dx, dy in ((11, 11), (-11, 11), (11, -11), (-11, -11))]
YOURS = "#1f4fbf"  # user points: a colour no published point or area uses
# One colour and hatch per area asked for, so stacked areas stay apart (none is green/red/gold).
AREA_STYLES = [("#6a3d9a", "//"), ("#1f78b4", "\\\\"), ("#e6550d", "xx"), ("#17becf", ".."),
               ("#8c564b", "++"), ("#e377c2", "--"), ("#636363", "oo"), ("#b15928", "**")]
AREAS_HINT = "infeasible areas: none drawn (--areas METHOD draws one)"


def _gid(prefix: str, name: str) -> str:
    """An SVG id for an artist (lets tests and stylesheets find it)."""
    return prefix + "-" + (re.sub(r"[^A-Za-z0-9_-]+", "_", name) or "_")


def _label(m: MethodEfficiency) -> str:
    return m.method if m.published else f"{m.method} (yours)"


def _place_labels(fig: Any, ax: Any, methods: Sequence[MethodEfficiency],
                  shifts: dict[str, tuple[float, float]]) -> None:
    """Annotate each point, trying offsets until its label overlaps no label, marker or edge.
    `shifts`: markers drawn away from their data position (in points); labels follow them."""
    from matplotlib.transforms import Bbox, offset_copy

    renderer = fig.canvas.get_renderer()
    axes_box = ax.get_window_extent(renderer)
    to_px = fig.dpi / 72.0
    markers = []
    for m in methods:
        sx, sy = shifts.get(m.method, (0.0, 0.0))
        px, py = ax.transData.transform((m.x, m.pir))
        r = 5 if m.published else 9
        markers.append(Bbox.from_extents(px + sx * to_px - r, py + sy * to_px - r, px + sx * to_px + r, py + sy * to_px + r))
    placed: list[Any] = []

    def annotate(m: MethodEfficiency, dx: float, dy: float, **kw: Any) -> Any:
        sx, sy = shifts.get(m.method, (0.0, 0.0))
        where = offset_copy(ax.transData, fig=fig, x=sx, y=sy, units="points") if (sx or sy) else "data"
        return ax.annotate(
            _label(m), (m.x, m.pir), xycoords=where, xytext=(dx, dy), textcoords="offset points",
            ha="left" if dx > 0 else ("right" if dx < 0 else "center"),
            va="bottom" if dy > 0 else "top", fontsize=8,
            color="black" if m.published else YOURS, fontweight="normal" if m.published else "bold", **kw,
        )

    # Crowded points first, so they get the nearest slots.
    for m in sorted(methods, key=lambda m: (m.x, -m.pir)):
        best, best_cost = None, math.inf
        for dx, dy in _OFFSETS:
            ann = annotate(m, dx, dy)
            box = ann.get_window_extent(renderer)
            cost = sum(_overlap(box, other) for other in placed + markers)
            outside = box.x0 < axes_box.x0 or box.x1 > axes_box.x1 or box.y0 < axes_box.y0 or box.y1 > axes_box.y1
            cost += 1e6 if outside else 0.0
            cost += 0.01 * math.hypot(dx, dy)  # prefer near slots among equals
            if cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (ann, box, dx, dy), cost
            else:
                ann.remove()
            if cost < 1:
                break
        assert best is not None
        ann, box, dx, dy = best
        if math.hypot(dx, dy) > 16:  # far from its point: draw a leader line
            ann.remove()
            ann = annotate(m, dx, dy, arrowprops={"arrowstyle": "-", "color": GREY, "lw": 0.6})
        placed.append(box)


def _point_colour(m: MethodEfficiency) -> str:
    return {"superior": GREEN, "inferior": RED}.get(m.position, GOLD)


def _nudge_user_points(ax: Any, methods: Sequence[MethodEfficiency], dpi: float) -> dict[str, tuple[float, float]]:
    """Offsets (points) for user points that would sit on another marker: a user point at a
    published point's SDF and PIR must not hide under it (nor hide it)."""
    to_px = dpi / 72.0
    taken = [tuple(ax.transData.transform((m.x, m.pir))) for m in methods if m.published]
    shifts: dict[str, tuple[float, float]] = {}
    for m in methods:
        if m.published:
            continue
        px, py = ax.transData.transform((m.x, m.pir))
        for dx, dy in [(0.0, 0.0), *_NUDGES]:
            x, y = px + dx * to_px, py + dy * to_px
            if all(math.hypot(x - tx, y - ty) >= 12 * to_px for tx, ty in taken):
                break
        taken.append((x, y))
        if dx or dy:
            shifts[m.method] = (dx, dy)
    return shifts


def plot_efficiency(result: EfficiencyResult, path: Path | str, *, areas: Sequence[str] = ()) -> Path:
    """Draw the efficiency graph (like the survey's Figure 4) to a .png or .svg file.

    Yellow: the baseline; green/red: each method's vertical gap to the baseline
    (CEff, Eq. 5) for superior/inferior methods. Published methods are dots
    (hollow: PIR from the bridge); your own points are hollow blue stars, moved
    aside with a leader line when they would sit on a published point.
    Infeasible areas are drawn only for the methods named in `areas` (all of
    them stacked cannot be told apart), each in its own colour and hatch.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Polygon
    from matplotlib.transforms import offset_copy

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg"):
        raise TamisError(f"{path}: plot format must be .png or .svg, got {path.suffix or '(none)'}")
    chosen = area_methods(result, areas)

    fig = Figure(figsize=(9, 6), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x0, x1, y0, y1 = result.bounds
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)

    area_handles = []
    for i, name in enumerate(chosen):
        colour, hatch = AREA_STYLES[i % len(AREA_STYLES)]
        style = {"facecolor": to_rgba(colour, 0.10), "edgecolor": to_rgba(colour, 0.85), "hatch": hatch, "lw": 0.8}
        for poly in result.method(name).infeasible.polygons:
            patch = Polygon(poly, closed=True, zorder=1, **style)
            patch.set_gid(_gid("infeasible-area", name))
            ax.add_patch(patch)
        holds = [inside for inside, owner in result.incomparable_pairs if owner == name]
        area_handles.append(Patch(**style, label=f"infeasible area of {name}"
                                  + (f" (holds {', '.join(holds)})" if holds else "")))

    base = result.baseline
    ax.plot([x0, x1], [base.at(x0), base.at(x1)], color=GOLD, lw=2, zorder=2)
    for m in result.methods:
        if m.position != "baseline":
            ax.plot([m.x, m.x], [m.pir, base.at(m.x)], color=_point_colour(m), lw=1.6, zorder=3)
    for m in result.methods:
        if m.published:
            colour = _point_colour(m)
            ax.scatter([m.x], [m.pir], s=46, marker="o", facecolors="white" if m.pir_estimated else colour,
                       edgecolors=colour, linewidths=1.5, zorder=4, gid=_gid("published-point", m.method))
    ax.set_xlabel("SDF: selected / candidate pool size" + (" (log10)" if base.x_scale == "log" else ""))
    ax.set_ylabel("PIR: same-model wins-rate ratio")
    ax.set_title("Efficiency graph (survey Sec. 6.1, Figure 4)")
    ax.grid(True, lw=0.3, alpha=0.5)
    handles = [
        Line2D([], [], color=GOLD, lw=2, label=f"baseline: {base.reference[0]} - {base.reference[1]}"),
        Line2D([], [], color=GREEN, lw=1.6, label="superior (above baseline)"),
        Line2D([], [], color=RED, lw=1.6, label="inferior (below baseline)"),
        Line2D([], [], marker="o", ls="", color=GREY, label="published method"),
        Line2D([], [], marker="o", ls="", markerfacecolor="white", markeredgecolor=GREY, label="published, PIR from bridge"),
    ]
    yours = [m for m in result.methods if not m.published]
    handles += [Line2D([], [], marker="*", ls="", markersize=12, markerfacecolor="white", markeredgecolor=YOURS,
                       markeredgewidth=1.8, label=f"yours: {m.method}") for m in yours]
    handles += area_handles or [Patch(facecolor="none", edgecolor=GREY, ls="--", lw=0.6, label=AREAS_HINT)]
    # Below the axes, so it never hides a point or label.
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=3, fontsize=7, frameon=False)
    fig.tight_layout()
    # After layout, in display space: whether a user point would cover a published one.
    shifts = _nudge_user_points(ax, result.methods, fig.dpi)
    for m in yours:
        sx, sy = shifts.get(m.method, (0.0, 0.0))
        where = offset_copy(ax.transData, fig=fig, x=sx, y=sy, units="points") if (sx or sy) else ax.transData
        if sx or sy:  # a leader from the true position, which stays exact
            ax.annotate("", (m.x, m.pir), xycoords=where, xytext=(m.x, m.pir), textcoords="data",
                        arrowprops={"arrowstyle": "-", "color": YOURS, "lw": 0.9, "shrinkA": 0, "shrinkB": 6},
                        zorder=5)
        ax.scatter([m.x], [m.pir], s=230, marker="*", facecolors="white", edgecolors=YOURS, linewidths=2.2,
                   transform=where, zorder=6, gid=_gid("your-point", m.method))
    _place_labels(fig, ax, result.methods, shifts)  # after layout: label boxes need final positions
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt)
    return path


# --------------------------------------------------------------------------- #
# HTML
# --------------------------------------------------------------------------- #


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure_html(plot: Path | str | None) -> str:
    """Inline SVG (text or .svg file) or a base64 PNG; empty when no plot."""
    if plot is None:
        return ""
    if isinstance(plot, str) and plot.lstrip().startswith("<"):
        svg = plot
    else:
        path = Path(plot)
        if path.suffix.lower() == ".png":
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            return f'<img alt="efficiency graph" src="data:image/png;base64,{data}">'
        svg = read_utf8(path, "plot")
    # An inline <svg> must not carry the XML prolog.
    svg = re.sub(r"^\s*<\?xml[^>]*>\s*", "", svg)
    svg = re.sub(r"^\s*<!DOCTYPE[^>]*>\s*", "", svg)
    return f'<div class="efficiency-figure">{svg}</div>'


def efficiency_html_section(result: EfficiencyResult, plot_path_or_svg_text: Path | str | None) -> str:
    """An HTML fragment (heading, figure, ranking table, bridge, findings) for `tamis report`."""
    fit = result.bridge
    parts = [
        '<section class="efficiency">',
        "<h2>Efficiency comparison</h2>",
        _figure_html(plot_path_or_svg_text),
        _html_table(RANKING_HEADER, ranking_rows(result)),
        f"<p><strong>Bridge:</strong> {html.escape(_bridge_sentence(fit))}</p>",
    ]
    if result.bridge_estimates:
        parts.append(_html_table(ESTIMATE_HEADER, estimate_rows(result.bridge_estimates, result.alternative_estimates)))
    if result.findings:
        items = "".join(f"<li>{html.escape(f)}</li>" for f in result.findings)
        parts.append(f"<h3>Findings</h3><ul>{items}</ul>")
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


# --------------------------------------------------------------------------- #
# One call for the CLI
# --------------------------------------------------------------------------- #


def run_efficiency(paths: Sequence[Path | str] | None = None, *, as_json: bool = False, plot: Path | str | None = None,
                   areas: Sequence[str] = ()) -> str:
    """What `tamis efficiency [POINTS...] [--json] [--plot FILE] [--areas METHOD ...]` prints."""
    result = compute_efficiency(load_points(list(paths) if paths else None))
    area_methods(result, areas)  # a typo is an error even without --plot
    if areas and plot is None:
        raise TamisError("--areas draws infeasible areas on the graph: add --plot FILE.svg (or .png)")
    if plot is not None:
        plot_efficiency(result, plot, areas=areas)
    return json.dumps(efficiency_json(result), indent=2) if as_json else efficiency_markdown(result)
