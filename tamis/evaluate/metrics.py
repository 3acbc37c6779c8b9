"""PIR and SDF from your own runs, in the efficiency report's terms (survey Sec. 6.1, App. A.1).

Each trained method (a recipe's selection, or the random control) is compared with the BM of the
same seed, in two of the survey's groups:

* ``same_model_wins``: the wins-rate of SEM against BM (pairwise judge, both orders);
* ``same_model_bench``: held-out answer loss, BM loss / SEM loss. The survey's ratio is SEM score
  over BM score for a higher-is-better score; a loss is lower-is-better, so its performance is
  1 / loss and the ratio is inverted (> 1: the selection did better).

One points row per seed and group: `tamis efficiency` averages rows within a group (Eq. 1, the
arithmetic of `tamis.report.efficiency.group_means`), so the placed PIR is the mean over seeds, and
the spread over seeds is reported beside it. SDF = selected size / pool size (`efficiency.sdf`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

from tamis.report.efficiency import Point, group_means, sdf

WINS, BENCH = "same_model_wins", "same_model_bench"


@dataclass(frozen=True)
class Spread:
    mean: float
    std: float | None  # sample standard deviation over seeds (None with one seed)
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        v = list(values)
        return cls(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None, min(v), max(v), len(v))

    def text(self, digits: int = 3) -> str:
        pm = f" ± {self.std:.{digits}f}" if self.std is not None else ""
        return f"{self.mean:.{digits}f}{pm}"

    def to_json(self) -> dict:
        return {"mean": self.mean, "std": self.std, "min": self.low, "max": self.high, "n": self.n}


def loss_ratio(bm_loss: float, sem_loss: float) -> float:
    """The bench ratio of a held-out loss: BM loss / SEM loss (see the module note)."""
    return bm_loss / sem_loss


def pir_by_group(points: Iterable[Point]) -> dict[str, dict[str, float]]:
    """Eq. 1 over the given rows: method -> group -> mean ratio (the efficiency report's own arithmetic)."""
    return group_means(points)


def spreads(points: Iterable[Point]) -> dict[str, dict[str, Spread]]:
    """method -> group -> the ratios' spread over the rows (one per seed)."""
    by: dict[str, dict[str, list[float]]] = {}
    for p in points:
        by.setdefault(p.method, {}).setdefault(p.group, []).append(p.value)
    return {m: {g: Spread.of(v) for g, v in groups.items()} for m, groups in by.items()}


def method_sdf(selected: int, pool: int) -> float:
    return sdf(selected, pool)


def point(method: str, sem: str, group: str, value: float, selected: int, pool: int, source: str,
          note: str | None = None) -> Point:
    return Point(method=method, sem=sem, counterpart="BM (same PFM, same training, on the whole pool)", group=group,
                 value=value, selected_size=selected, pool_size=pool, source=source, note=note)


POINT_FIELDS = ("method", "sem", "counterpart", "group", "value", "selected_size", "pool_size", "source",
                "confirmed", "note")


def points_csv(points: Sequence[Point]) -> str:
    """The points file (README "Points file format"), as `tamis efficiency FILE.csv` reads it."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(POINT_FIELDS)
    for p in points:
        w.writerow([p.method, p.sem, p.counterpart, p.group, repr(float(p.value)), p.selected_size, p.pool_size,
                    p.source, "true", p.note or ""])
    return buf.getvalue()
