"""The survey's efficiency comparison of data selectors, as pure functions.

Implements Section 6.1 and Appendix A.1-A.3 of "Take the essence and discard
the dross: A Rethinking on Data Selection for Fine-Tuning LLMs":

* PIR (performance improvement ratio): the mean ratio SEM/counterpart within
  each of four evaluation groups (Eq. 1). The same-model wins rate is the
  representative group; a method without it gets an estimate from a linear
  "bridge" fitted on the methods that have both (Appendix A.1).
* SDF (selected dataset fraction) = selected size / candidate pool size.
* The efficiency baseline: the line through two reference methods (default
  Instruction-Mining and InstructionGPT-4) in the (SDF, PIR) plane; each
  method's signed distance to it (Eq. 5-7; positive = above = superior).
* Infeasible areas (Appendix A.3) and the pairs they make incomparable.

Everything here is deterministic and side-effect free except the loaders.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from tamis.errors import DataError, RowProblem, TamisError

# --------------------------------------------------------------------------- #
# Constants taken from the survey
# --------------------------------------------------------------------------- #

REPRESENTATIVE_GROUP = "same_model_wins"
GROUPS: tuple[str, ...] = (
    "same_model_wins",
    "same_model_bench",
    "other_models_wins",
    "other_models_bench",
)
DEFAULT_REFERENCE: tuple[str, str] = ("Instruction-Mining", "InstructionGPT-4")

# The survey's own parenthesised bridge estimates (Table 2 / Appendix Table 4).
# Kept only to compare against; they are never used as inputs.
SURVEY_ESTIMATES: dict[str, float] = {"LESS": 1.570, "Instruction-Mining": 1.400}
SURVEY_ESTIMATES_SOURCE = "Survey Table 2 / Appendix Table 4 (values in parentheses)"

REQUIRED_FIELDS: tuple[str, ...] = (
    "method",
    "sem",
    "counterpart",
    "group",
    "value",
    "selected_size",
    "pool_size",
    "source",
)
OPTIONAL_FIELDS: tuple[str, ...] = ("size_source", "confirmed", "note")

XScale = Literal["linear", "log"]
BridgeMode = Literal["pooled", "per_group"]
Position = Literal["superior", "inferior", "baseline"]

_TOL = 1e-9


class EfficiencyError(TamisError):
    """The points cannot support the comparison (e.g. a reference method is missing)."""


# --------------------------------------------------------------------------- #
# Points: format and validation
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Point:
    """One evaluated setting of one selector: a row of a points file."""

    method: str
    sem: str
    counterpart: str
    group: str
    value: float
    selected_size: int
    pool_size: int
    source: str
    size_source: str | None = None
    confirmed: bool = True
    note: str | None = None
    file: str = "<memory>"
    row: int = 0


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes", "y"):
        return True
    if text in ("false", "0", "no", "n"):
        return False
    raise ValueError(f"expected true/false, got {raw!r}")


def _parse_positive_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError(f"expected a positive integer, got {raw!r}")
    if isinstance(raw, float):
        if not raw.is_integer():
            raise ValueError(f"expected a positive integer, got {raw!r}")
        raw = int(raw)
    try:
        number = int(str(raw).strip().replace(",", "").replace("_", ""))
    except ValueError:
        raise ValueError(f"expected a positive integer, got {raw!r}") from None
    if number <= 0:
        raise ValueError(f"must be > 0, got {number}")
    return number


def _parse_ratio(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError(f"expected a number, got {raw!r}")
    try:
        number = float(str(raw).strip())
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"a performance ratio must be a finite number > 0, got {raw!r}")
    return number


def _blank(raw: Any) -> bool:
    return raw is None or (isinstance(raw, str) and not raw.strip())


def parse_point(record: Any, file: str, row: int) -> tuple[Point | None, list[RowProblem]]:
    """Validate one raw record; return the point or the problems found (all of them)."""
    if not isinstance(record, dict):
        return None, [RowProblem(file, row, None, f"expected an object with fields, got {type(record).__name__}")]
    problems: list[RowProblem] = []
    known = set(REQUIRED_FIELDS) | set(OPTIONAL_FIELDS)
    for key in record:
        if key not in known:
            problems.append(RowProblem(file, row, str(key), f"unknown field; expected one of {sorted(known)}"))
    for name in REQUIRED_FIELDS:
        if _blank(record.get(name)):
            problems.append(RowProblem(file, row, name, "missing (required)"))

    values: dict[str, Any] = {}
    parsers = {
        "value": _parse_ratio,
        "selected_size": _parse_positive_int,
        "pool_size": _parse_positive_int,
    }
    for name, parse in parsers.items():
        if not _blank(record.get(name)):
            try:
                values[name] = parse(record[name])
            except ValueError as exc:
                problems.append(RowProblem(file, row, name, str(exc)))
    group = record.get("group")
    if not _blank(group) and str(group).strip() not in GROUPS:
        problems.append(RowProblem(file, row, "group", f"unknown group {group!r}; expected one of {list(GROUPS)}"))
    confirmed = True
    if not _blank(record.get("confirmed")):
        try:
            confirmed = _parse_bool(record["confirmed"])
        except ValueError as exc:
            problems.append(RowProblem(file, row, "confirmed", str(exc)))
    if "selected_size" in values and "pool_size" in values and values["selected_size"] > values["pool_size"]:
        problems.append(
            RowProblem(
                file, row, "selected_size",
                f"selected_size {values['selected_size']} exceeds pool_size {values['pool_size']}",
            )
        )
    if problems:
        return None, problems

    def text(name: str) -> str | None:
        raw = record.get(name)
        return None if _blank(raw) else str(raw).strip()

    return (
        Point(
            method=str(record["method"]).strip(),
            sem=str(record["sem"]).strip(),
            counterpart=str(record["counterpart"]).strip(),
            group=str(group).strip(),
            value=values["value"],
            selected_size=values["selected_size"],
            pool_size=values["pool_size"],
            source=str(record["source"]).strip(),
            size_source=text("size_source"),
            confirmed=confirmed,
            note=text("note"),
            file=file,
            row=row,
        ),
        [],
    )


def parse_points(records: Sequence[Any], file: str) -> list[Point]:
    """Validate every record of one file; raise `DataError` listing all problems."""
    points: list[Point] = []
    problems: list[RowProblem] = []
    for index, record in enumerate(records, start=1):
        point, found = parse_point(record, file, index)
        problems.extend(found)
        if point is not None:
            points.append(point)
    if problems:
        raise DataError(f"{file}: invalid efficiency points", problems)
    return points


def read_utf8(path: Path, what: str) -> str:
    """A text file's contents; bytes that are not UTF-8 are a located error, not a traceback."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        column = len(before[before.rfind(b"\n") + 1 :].decode("utf-8", errors="replace")) + 1
        raise DataError(
            f"{path}: {what} is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}, "
            f"column {column} (byte {exc.start}); save it as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # a byte-order mark, as spreadsheet programs write


def _read_records(path: Path) -> list[Any]:
    """Rows of a JSON (a list, or an object with a "points" list) or CSV file."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise DataError(f"{path}: unsupported points file type {suffix or '(none)'}; use .json or .csv")
    text = read_utf8(path, "points file")
    if suffix == ".csv":
        # Record numbers are data rows (header excluded), 1-based.
        return list(csv.DictReader(text.splitlines()))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from exc
    if isinstance(data, dict):
        data = data.get("points")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of points or an object with a 'points' list")
    return data


def load_points_file(path: Path | str) -> list[Point]:
    """Load and validate one points file (.json or .csv)."""
    path = Path(path)
    return parse_points(_read_records(path), str(path))


def published_points_path() -> Path:
    """Where the shipped published points live."""
    return Path(str(resources.files("tamis.report") / "data" / "published_points.json"))


def load_points(paths: Sequence[Path | str] | None = None, *, include_published: bool | None = None) -> list[Point]:
    """Load points. None = the shipped published points only.

    With paths, the published points are added too (so a user's own recipe is
    placed against the survey's methods and baseline) unless
    `include_published=False`.
    """
    if paths is None:
        return load_points_file(published_points_path())
    points: list[Point] = []
    if include_published is None or include_published:
        points.extend(load_points_file(published_points_path()))
    for path in paths:
        points.extend(load_points_file(path))
    check_consistent_sizes(points)
    return points


def check_consistent_sizes(points: Iterable[Point]) -> dict[str, tuple[int, int]]:
    """Every row of a method must carry the same sizes; return method -> (selected, pool)."""
    sizes: dict[str, tuple[int, int]] = {}
    first: dict[str, Point] = {}
    problems: list[RowProblem] = []
    for p in points:
        pair = (p.selected_size, p.pool_size)
        if p.method not in sizes:
            sizes[p.method], first[p.method] = pair, p
        elif sizes[p.method] != pair:
            f = first[p.method]
            problems.append(
                RowProblem(
                    p.file, p.row, "selected_size",
                    f"method {p.method!r} has sizes {pair[0]}/{pair[1]} here but "
                    f"{f.selected_size}/{f.pool_size} at {f.file} row {f.row}; "
                    "give a re-evaluated recipe its own method name",
                )
            )
    if problems:
        raise DataError("conflicting dataset sizes for the same method", problems)
    return sizes


# --------------------------------------------------------------------------- #
# PIR and the bridge (Eq. 1, Appendix A.1)
# --------------------------------------------------------------------------- #


def group_means(points: Iterable[Point]) -> dict[str, dict[str, float]]:
    """Eq. 1: average the ratios of each method within each evaluation group."""
    buckets: dict[str, dict[str, list[float]]] = {}
    for p in points:
        buckets.setdefault(p.method, {}).setdefault(p.group, []).append(p.value)
    return {m: {g: float(np.mean(v)) for g, v in groups.items()} for m, groups in buckets.items()}


@dataclass(frozen=True)
class BridgePair:
    """One (other-group value -> representative value) observation used in the fit."""

    method: str
    group: str
    x: float
    y: float


@dataclass(frozen=True)
class BridgeFit:
    """The fitted bridge: representative PIR ~ slope * other-group ratio + intercept.

    `mode="pooled"` is one line over all non-representative groups (the
    appendix's single "bridge function"). `mode="per_group"` is a multiple
    regression with one coefficient per group and blanks read as 0; it is kept
    as a reconstruction of how the survey's numbers may have been produced.
    """

    mode: BridgeMode
    slope: float | None
    intercept: float
    coefficients: dict[str, float]
    groups: tuple[str, ...]
    fitted_methods: tuple[str, ...]
    pairs: tuple[BridgePair, ...]
    r_squared: float | None

    def predict(self, group_values: dict[str, float]) -> tuple[float | None, tuple[str, ...]]:
        """Estimate the representative PIR from a method's other-group values.

        Returns the estimate (None when no usable group) and the groups used.
        Groups the bridge was not fitted on are ignored: extrapolating to them
        would be a guess.
        """
        usable = tuple(g for g in self.groups if g in group_values)
        if not usable:
            return None, ()
        if self.mode == "pooled":
            assert self.slope is not None
            estimates = [self.slope * group_values[g] + self.intercept for g in usable]
            return float(np.mean(estimates)), usable
        total = self.intercept + sum(self.coefficients[g] * group_values[g] for g in usable)
        return float(total), usable


def bridge_pairs(means: dict[str, dict[str, float]], representative: str = REPRESENTATIVE_GROUP) -> list[BridgePair]:
    """Observations for the bridge: methods that have the representative group and another one."""
    pairs = []
    for method, groups in means.items():
        if representative not in groups:
            continue
        for group in GROUPS:
            if group != representative and group in groups:
                pairs.append(BridgePair(method, group, groups[group], groups[representative]))
    return pairs


def _r_squared(y: np.ndarray, predicted: np.ndarray) -> float | None:
    total = float(np.sum((y - y.mean()) ** 2))
    return None if total == 0 else 1.0 - float(np.sum((y - predicted) ** 2)) / total


def fit_bridge(
    means: dict[str, dict[str, float]],
    mode: BridgeMode = "pooled",
    representative: str = REPRESENTATIVE_GROUP,
) -> BridgeFit | None:
    """Least-squares bridge from the other groups to the representative group.

    Returns None when there are too few observations to fit a line.
    """
    pairs = bridge_pairs(means, representative)
    groups = tuple(g for g in GROUPS if any(p.group == g for p in pairs))
    fitted = tuple(sorted({p.method for p in pairs}))
    if mode == "pooled":
        x = np.array([p.x for p in pairs])
        y = np.array([p.y for p in pairs])
        if len(pairs) < 2 or np.ptp(x) == 0:
            return None
        slope, intercept = np.polyfit(x, y, 1)
        r2 = _r_squared(y, slope * x + intercept)
        return BridgeFit(
            "pooled", float(slope), float(intercept), {g: float(slope) for g in groups},
            groups, fitted, tuple(pairs), r2,
        )
    # per_group: one row per fitted method, one column per group, blanks = 0.
    rows = [[means[m].get(g, 0.0) for g in groups] + [1.0] for m in fitted]
    y = np.array([means[m][representative] for m in fitted])
    if len(fitted) < len(groups) + 1:
        return None
    design = np.array(rows)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    r2 = _r_squared(y, design @ coef)
    return BridgeFit(
        "per_group", None, float(coef[-1]), {g: float(c) for g, c in zip(groups, coef[:-1])},
        groups, fitted, tuple(pairs), r2,
    )


@dataclass(frozen=True)
class BridgeEstimate:
    """A representative PIR estimated through the bridge, next to the survey's own."""

    method: str
    estimate: float
    from_groups: tuple[str, ...]
    inputs: dict[str, float]
    ignored_groups: tuple[str, ...]
    survey_value: float | None
    difference: float | None  # estimate - survey_value


def estimate_missing(means: dict[str, dict[str, float]], bridge: BridgeFit | None) -> list[BridgeEstimate]:
    """Bridge estimates for every method lacking the representative group."""
    estimates = []
    for method, groups in means.items():
        if REPRESENTATIVE_GROUP in groups or bridge is None:
            continue
        value, used = bridge.predict(groups)
        if value is None:
            continue
        survey = SURVEY_ESTIMATES.get(method)
        estimates.append(
            BridgeEstimate(
                method=method,
                estimate=value,
                from_groups=used,
                inputs={g: groups[g] for g in used},
                ignored_groups=tuple(g for g in groups if g not in used),
                survey_value=survey,
                difference=None if survey is None else value - survey,
            )
        )
    return estimates


# --------------------------------------------------------------------------- #
# SDF, the baseline and signed distances (Eq. 5-7)
# --------------------------------------------------------------------------- #


def sdf(selected_size: int, pool_size: int) -> float:
    """Selected dataset fraction = selected size / candidate pool size."""
    if pool_size <= 0 or selected_size <= 0:
        raise ValueError("sizes must be positive")
    return selected_size / pool_size


def to_x(fraction: float, x_scale: XScale = "linear") -> float:
    """The graph's x coordinate for an SDF.

    The survey's efficiency graph (Figures 3, 4, 7) uses SDF on a *linear*
    axis: its efficiency curves are described as "logarithm-like ... upward,
    concave" in SDF, which only reads that way on a linear axis (on a log axis
    a log curve is a straight line). "linear" is therefore the default; "log"
    (log10 SDF) is offered for exploration only.
    """
    return math.log10(fraction) if x_scale == "log" else fraction


@dataclass(frozen=True)
class Baseline:
    """The efficiency baseline l_base: y = slope * x + intercept through two reference methods."""

    reference: tuple[str, str]
    slope: float
    intercept: float
    x_scale: XScale

    @property
    def theta(self) -> float:
        """Angle between the baseline and the x axis, radians."""
        return math.atan(self.slope)

    def at(self, x: float) -> float:
        return self.slope * x + self.intercept


def baseline_through(reference: tuple[str, str], a: tuple[float, float], b: tuple[float, float], x_scale: XScale) -> Baseline:
    """The line through two reference points (x, y)."""
    (x1, y1), (x2, y2) = a, b
    if abs(x2 - x1) < _TOL:
        raise EfficiencyError(f"reference methods {reference[0]!r} and {reference[1]!r} have the same SDF; no baseline")
    slope = (y2 - y1) / (x2 - x1)
    return Baseline(reference, slope, y1 - slope * x1, x_scale)


def vertical_gap(baseline: Baseline, x: float, y: float) -> float:
    """Eq. 5: CEff^k = f_k(x_k) - f_b(x_k), the PIR above (+) or below (-) the baseline."""
    return y - baseline.at(x)


def signed_distance(baseline: Baseline, x: float, y: float) -> float:
    """Signed perpendicular distance from (x, y) to the baseline; positive above.

    Geometrically D = CEff * cos(theta). The survey's Eq. 6 prints
    D = CEff * cos(90deg - theta) (= sin theta); both are a constant multiple of
    CEff for a fixed baseline, so by Eq. 7 the ranking is the same either way.
    """
    return vertical_gap(baseline, x, y) * math.cos(baseline.theta)


def position_of(distance: float) -> Position:
    if distance > _TOL:
        return "superior"
    if distance < -_TOL:
        return "inferior"
    return "baseline"


# --------------------------------------------------------------------------- #
# Infeasible areas (Appendix A.3)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class InfeasibleArea:
    """The possible area of one method's efficiency curve: a double wedge at its point.

    Bounded by two lines through the point (Appendix A.3): one parallel to the
    baseline, and

    * inferior and on-baseline methods: a horizontal line (the SEM should do at
      least as well on more data of the same quality, and an inferior curve
      rises more slowly than the baseline);
    * superior methods: the line towards the anchor method (Instruction-Mining
      by default), because efficiency curves never cross and a concave curve
      stays above that chord. When the superior method lies *left* of the
      anchor that line falls below the parallel one, which would contradict
      "a superior curve is steeper than the baseline"; the area is then bounded
      by the vertical instead (slope_high = +inf).

    The curve exists on both sides of the point, so the area is the pair of
    opposite sectors between the two lines: a point lies inside when the slope
    from the owner to it is strictly between `slope_low` and `slope_high`.
    """

    owner: str
    apex: tuple[float, float]
    slope_low: float
    slope_high: float  # may be math.inf
    polygons: tuple[tuple[tuple[float, float], ...], ...]

    def contains(self, x: float, y: float) -> bool:
        ax, ay = self.apex
        dx = x - ax
        if abs(dx) < _TOL:
            return False  # exactly above/below: on the boundary at best
        slope = (y - ay) / dx
        return self.slope_low + _TOL < slope < self.slope_high - _TOL


Bounds = tuple[float, float, float, float]  # x0, x1, y0, y1


def _clip(polygon: list[tuple[float, float]], bounds: Bounds) -> list[tuple[float, float]]:
    """Sutherland-Hodgman clip of a polygon to an axis-aligned box."""
    x0, x1, y0, y1 = bounds
    edges = [
        (lambda p: p[0] >= x0, lambda a, b: _cut_x(a, b, x0)),
        (lambda p: p[0] <= x1, lambda a, b: _cut_x(a, b, x1)),
        (lambda p: p[1] >= y0, lambda a, b: _cut_y(a, b, y0)),
        (lambda p: p[1] <= y1, lambda a, b: _cut_y(a, b, y1)),
    ]
    for keep, cut in edges:
        out: list[tuple[float, float]] = []
        for i, cur in enumerate(polygon):
            prev = polygon[i - 1]
            if keep(cur):
                if not keep(prev):
                    out.append(cut(prev, cur))
                out.append(cur)
            elif keep(prev):
                out.append(cut(prev, cur))
        polygon = out
        if not polygon:
            break
    return polygon


def _cut_x(a: tuple[float, float], b: tuple[float, float], x: float) -> tuple[float, float]:
    t = (x - a[0]) / (b[0] - a[0])
    return x, a[1] + t * (b[1] - a[1])


def _cut_y(a: tuple[float, float], b: tuple[float, float], y: float) -> tuple[float, float]:
    t = (y - a[1]) / (b[1] - a[1])
    return a[0] + t * (b[0] - a[0]), y


def wedge_polygons(
    apex: tuple[float, float], slopes: tuple[float, float], bounds: Bounds
) -> tuple[tuple[tuple[float, float], ...], ...]:
    """The double wedge clipped to the graph's bounds, as up to two polygons."""
    ax, ay = apex
    reach = 10.0 * max(bounds[1] - bounds[0], bounds[3] - bounds[2], 1.0)
    polygons = []
    for side in (1.0, -1.0):
        corners = [(ax, ay)]
        for s in slopes:
            # A direction of slope s on this side; an infinite slope is vertical.
            dx, dy = (0.0, side) if math.isinf(s) else (side, side * s)
            norm = math.hypot(dx, dy)
            corners.append((ax + reach * dx / norm, ay + reach * dy / norm))
        clipped = _clip(corners, bounds)
        if len(clipped) >= 3:
            polygons.append(tuple(clipped))
    return tuple(polygons)


def infeasible_area(
    owner: str,
    apex: tuple[float, float],
    position: Position,
    baseline: Baseline,
    anchor: tuple[float, float] | None,
    bounds: Bounds,
) -> InfeasibleArea:
    """Appendix A.3's infeasible area of one method."""
    if position == "superior":
        low, high = baseline.slope, math.inf
        if anchor is not None and anchor[0] < apex[0] - _TOL:
            high = max(baseline.slope, (apex[1] - anchor[1]) / (apex[0] - anchor[0]))
    else:
        low, high = sorted((0.0, baseline.slope))
    return InfeasibleArea(owner, apex, low, high, wedge_polygons(apex, (low, high), bounds))


# --------------------------------------------------------------------------- #
# The whole comparison
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class MethodEfficiency:
    """One method placed on the efficiency graph."""

    method: str
    sem: str
    pir: float
    pir_estimated: bool
    selected_size: int
    pool_size: int
    sdf: float
    x: float
    vertical_gap: float
    signed_distance: float
    position: Position
    rank: int
    incomparable_with: tuple[str, ...]
    infeasible: InfeasibleArea
    sizes_confirmed: bool
    is_reference: bool
    published: bool  # every row came from the shipped published points


@dataclass(frozen=True)
class SurveyCheck:
    """One of the survey's conclusions, checked against the computed graph."""

    claim: str
    source: str
    holds: bool
    detail: str


@dataclass(frozen=True)
class EfficiencyResult:
    """Everything the report needs: ranking, bridge, baseline, areas, findings."""

    methods: tuple[MethodEfficiency, ...]  # ranked, best first
    baseline: Baseline
    bridge: BridgeFit | None
    bridge_estimates: tuple[BridgeEstimate, ...]
    alternative_bridge: BridgeFit | None
    alternative_estimates: tuple[BridgeEstimate, ...]
    group_means: dict[str, dict[str, float]]
    incomparable_pairs: tuple[tuple[str, str], ...]  # (inside, owner of the area)
    anchor: str
    bounds: Bounds
    survey_checks: tuple[SurveyCheck, ...]
    findings: tuple[str, ...]
    excluded: tuple[str, ...] = field(default=())

    @property
    def ranking(self) -> list[str]:
        return [m.method for m in self.methods]

    @property
    def discrepancies(self) -> list[SurveyCheck]:
        return [c for c in self.survey_checks if not c.holds]

    def method(self, name: str) -> MethodEfficiency:
        for m in self.methods:
            if m.method == name:
                return m
        raise KeyError(name)


def area_methods(result: EfficiencyResult, names: Iterable[str], flag: str = "--areas") -> tuple[str, ...]:
    """The placed methods `names` refers to (case is forgiven), in the order given, once each; an
    unknown name is an error naming `flag`, with the closest method names as suggestions."""
    placed = [m.method for m in result.methods]
    by_lower = {m.lower(): m for m in placed}
    chosen: list[str] = []
    for name in names:
        found = name if name in placed else by_lower.get(name.strip().lower())
        if found is None:
            close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(f'`{by_lower[c]}`' for c in close)}?" if close else ""
            raise EfficiencyError(f"{flag} {name}: no such method on the graph{hint} "
                                  f"(methods: {', '.join(sorted(placed, key=str.lower))})")
        if found not in chosen:
            chosen.append(found)
    return tuple(chosen)


def graph_bounds(coords: Sequence[tuple[float, float]], x_scale: XScale) -> Bounds:
    """Extent of the graph: x from 0 (linear) with a margin past the largest SDF; y padded."""
    xs, ys = [c[0] for c in coords], [c[1] for c in coords]
    if x_scale == "linear":
        x0, x1 = 0.0, max(xs) * 1.15 if max(xs) > 0 else 1.0
    else:
        pad = 0.15 * max(max(xs) - min(xs), 0.5)
        x0, x1 = min(xs) - pad, max(xs) + pad
    pad_y = 0.12 * max(max(ys) - min(ys), 0.1)
    return x0, x1, min(ys) - pad_y, max(ys) + pad_y


def incomparable_pairs(areas: dict[str, InfeasibleArea], coords: dict[str, tuple[float, float]]) -> list[tuple[str, str]]:
    """(inside, owner) for every method lying inside another method's infeasible area."""
    pairs = []
    for owner, area in areas.items():
        for other, (x, y) in coords.items():
            if other != owner and area.contains(x, y):
                pairs.append((other, owner))
    return sorted(pairs)


def compute_efficiency(
    points: Sequence[Point],
    reference: tuple[str, str] = DEFAULT_REFERENCE,
    *,
    x_scale: XScale = "linear",
    bridge: BridgeMode = "pooled",
    anchor: str | None = None,
) -> EfficiencyResult:
    """Place every method on the efficiency graph and rank them.

    `reference` names the two methods the baseline passes through; `anchor`
    (default: the first reference, Instruction-Mining as in Appendix A.3) is
    the method superior methods' infeasible boundary points to.
    """
    if not points:
        raise EfficiencyError("no efficiency points given")
    sizes = check_consistent_sizes(points)
    means = group_means(points)
    other_mode: BridgeMode = "per_group" if bridge == "pooled" else "pooled"
    fit = fit_bridge(means, bridge)
    alt_fit = fit_bridge(means, other_mode)
    estimates = estimate_missing(means, fit)
    alt_estimates = estimate_missing(means, alt_fit)
    findings: list[str] = []

    pir: dict[str, float] = {m: g[REPRESENTATIVE_GROUP] for m, g in means.items() if REPRESENTATIVE_GROUP in g}
    pir.update({e.method: e.estimate for e in estimates})
    excluded = tuple(sorted(set(means) - set(pir)))
    for method in excluded:
        findings.append(
            f"{method} has no {REPRESENTATIVE_GROUP} ratio and the bridge cannot estimate one "
            f"(groups {sorted(means[method])}); it is left off the graph."
        )
    for est in estimates:
        if est.ignored_groups:
            findings.append(
                f"{est.method}: groups {list(est.ignored_groups)} were not used for the bridge estimate "
                "because no method with a same-model wins rate reports them, so the bridge is not fitted there."
            )

    for name in reference:
        if name not in pir:
            raise EfficiencyError(
                f"reference method {name!r} is not among the placed methods {sorted(pir)}; "
                "include the published points or choose other reference methods"
            )
    anchor = anchor or reference[0]
    if anchor not in pir:
        raise EfficiencyError(f"anchor method {anchor!r} is not among the placed methods")

    first = {}
    for p in points:
        first.setdefault(p.method, p)
    confirmed = {m: all(p.confirmed for p in points if p.method == m) for m in pir}
    shipped = str(published_points_path())
    published = {m: all(p.file == shipped for p in points if p.method == m) for m in pir}
    fractions = {m: sdf(*sizes[m]) for m in pir}
    coords = {m: (to_x(fractions[m], x_scale), pir[m]) for m in pir}
    base = baseline_through(reference, coords[reference[0]], coords[reference[1]], x_scale)
    bounds = graph_bounds(list(coords.values()), x_scale)

    distances = {m: signed_distance(base, *coords[m]) for m in pir}
    positions = {m: position_of(d) for m, d in distances.items()}
    areas = {
        m: infeasible_area(m, coords[m], positions[m], base, coords[anchor], bounds) for m in pir
    }
    pairs = incomparable_pairs(areas, coords)
    partners: dict[str, set[str]] = {m: set() for m in pir}
    for inside, owner in pairs:
        partners[inside].add(owner)
        partners[owner].add(inside)

    order = sorted(pir, key=lambda m: (-distances[m], m))
    methods = tuple(
        MethodEfficiency(
            method=m,
            sem=first[m].sem,
            pir=pir[m],
            pir_estimated=REPRESENTATIVE_GROUP not in means[m],
            selected_size=sizes[m][0],
            pool_size=sizes[m][1],
            sdf=fractions[m],
            x=coords[m][0],
            vertical_gap=vertical_gap(base, *coords[m]),
            signed_distance=distances[m],
            position=positions[m],
            rank=i,
            incomparable_with=tuple(sorted(partners[m])),
            infeasible=areas[m],
            sizes_confirmed=confirmed[m],
            is_reference=m in reference,
            published=published[m],
        )
        for i, m in enumerate(order, start=1)
    )

    unconfirmed = [m.method for m in methods if not m.sizes_confirmed]
    if unconfirmed:
        findings.append(
            "Dataset sizes not confirmed from the method's own source (confirmed=false): "
            + ", ".join(unconfirmed) + "."
        )
    findings.extend(_estimate_findings(fit, estimates, alt_fit, alt_estimates))
    checks = tuple(check_survey_conclusions(methods, pairs, reference))
    for check in checks:
        if not check.holds:
            findings.append(f"Discrepancy with the survey ({check.source}): {check.claim} -- {check.detail}")

    return EfficiencyResult(
        methods=methods,
        baseline=base,
        bridge=fit,
        bridge_estimates=tuple(estimates),
        alternative_bridge=alt_fit,
        alternative_estimates=tuple(alt_estimates),
        group_means=means,
        incomparable_pairs=tuple(pairs),
        anchor=anchor,
        bounds=bounds,
        survey_checks=checks,
        findings=tuple(findings),
        excluded=excluded,
    )


def _estimate_findings(
    fit: BridgeFit | None,
    estimates: Sequence[BridgeEstimate],
    alt_fit: BridgeFit | None,
    alt_estimates: Sequence[BridgeEstimate],
) -> list[str]:
    """Say plainly how the recomputed bridge estimates compare with the survey's."""
    out = []
    alt = {e.method: e for e in alt_estimates}
    for est in estimates:
        if est.survey_value is None:
            continue
        line = (
            f"Bridge ({fit.mode if fit else '-'}) estimates {est.method} at {est.estimate:.3f}; "
            f"the survey prints ({est.survey_value:.3f}), difference {est.difference:+.3f}."
        )
        other = alt.get(est.method)
        if other is not None and alt_fit is not None:
            line += f" The {alt_fit.mode} variant gives {other.estimate:.3f} ({other.difference:+.3f})."
        out.append(line)
    return out


# --------------------------------------------------------------------------- #
# The survey's conclusions
# --------------------------------------------------------------------------- #


def check_survey_conclusions(
    methods: Sequence[MethodEfficiency],
    pairs: Sequence[tuple[str, str]],
    reference: tuple[str, str],
) -> list[SurveyCheck]:
    """Check Sec. 6.3 (IFD best, AlpaGasus worst) and Appendix A.3 (only DEITA in InsTag's area).

    A check is only made when the methods it talks about are present and the
    baseline is the survey's default one.
    """
    # Only the survey's own (published) methods: a user's extra recipe must not
    # turn "AlpaGasus is last" into a false discrepancy.
    names = [m.method for m in methods if m.published]
    by_name = {m.method: m for m in methods}
    checks: list[SurveyCheck] = []
    if tuple(reference) != DEFAULT_REFERENCE:
        return checks
    if "IFD" in names:
        checks.append(
            SurveyCheck(
                "IFD is the most efficient method", "Sec. 6.3", names[0] == "IFD",
                f"ranked first: {names[0]}; IFD ranked {names.index('IFD') + 1} of {len(names)}",
            )
        )
    if "AlpaGasus" in names:
        checks.append(
            SurveyCheck(
                "AlpaGasus is the least efficient method", "Sec. 6.3", names[-1] == "AlpaGasus",
                f"ranked last: {names[-1]}; AlpaGasus ranked {names.index('AlpaGasus') + 1} of {len(names)}",
            )
        )
    survey_methods = {"DEITA", "InsTag", "AlpaGasus", "SuperFiltering", "IFD", "Nuggets", "LESS", *DEFAULT_REFERENCE}
    if survey_methods <= set(names):
        relevant = sorted(p for p in pairs if set(p) <= set(names))
        expected = [("DEITA", "InsTag")]
        involved = sorted({name for pair in relevant for name in pair} | {"DEITA", "InsTag"})
        detail = (
            "incomparable pairs: "
            + (", ".join(f"{a} in {b}'s area" for a, b in relevant) or "none")
            + ". Positions: "
            + "; ".join(
                f"{n} SDF {by_name[n].sdf:.4f}, PIR {by_name[n].pir:.3f}, {by_name[n].position}" for n in involved
            )
        )
        checks.append(
            SurveyCheck(
                "All methods are mutually comparable except DEITA, which lies in InsTag's infeasible area",
                "Appendix A.3", relevant == expected, detail,
            )
        )
    return checks
