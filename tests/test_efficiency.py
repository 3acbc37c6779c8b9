"""The survey's efficiency comparison (Sec. 6.1, Appendix A.1-A.3) on the published points."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tamis.errors import DataError, TamisError
from tamis.report.efficiency import (
    EfficiencyError,
    Point,
    compute_efficiency,
    group_means,
    load_points,
    load_points_file,
    sdf,
)
from tamis.report.efficiency_cli import (
    efficiency_html_section,
    efficiency_json,
    efficiency_markdown,
    plot_efficiency,
    run_efficiency,
)

FIXTURES = Path(__file__).parent / "fixtures" / "efficiency"
MY_RECIPE = FIXTURES / "my_recipe.csv"


@pytest.fixture(scope="module")
def result():
    return compute_efficiency(load_points())


def row(**overrides):
    base = {
        "method": "M",
        "sem": "LLaMA-2 7B",
        "counterpart": "BM",
        "group": "same_model_wins",
        "value": 1.2,
        "selected_size": 10,
        "pool_size": 100,
        "source": "test",
    }
    base.update(overrides)
    return base


def write_json(tmp_path: Path, rows, name: str = "points.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- #
# Published points
# --------------------------------------------------------------------------- #


def test_published_points_carry_table_2_and_a_source_for_every_number():
    points = load_points()
    means = group_means(points)
    # Survey Table 2 / Appendix Table 4, non-parenthesised values only.
    assert means["IFD"] == {"same_model_wins": 1.747}
    assert means["AlpaGasus"] == {"same_model_wins": 1.284, "same_model_bench": 0.949}
    assert means["LESS"] == {"same_model_bench": 0.973}  # (1.570) is an estimate, not an input
    assert means["Instruction-Mining"] == {"other_models_wins": 0.212, "other_models_bench": 0.991}
    assert all(p.source and p.size_source for p in points)
    # The survey's stated candidate-size range: 3,439 (InstructionGPT-4) to 306,044 (InsTag).
    pools = {p.method: p.pool_size for p in points}
    assert min(pools.values()) == 3439 == pools["InstructionGPT-4"]
    assert max(pools.values()) == 306044 == pools["InsTag"]


def test_sdf_by_hand():
    assert sdf(200, 3439) == pytest.approx(0.0581564)  # InstructionGPT-4
    assert sdf(2532, 100000) == pytest.approx(0.02532)  # Instruction-Mining
    assert sdf(9000, 52002) == pytest.approx(0.1730703)  # AlpaGasus


def test_eq1_averages_rows_of_a_group():
    points = [Point("M", "s", "BM", "same_model_wins", v, 1, 10, "t") for v in (1.0, 1.5)]
    assert group_means(points) == {"M": {"same_model_wins": 1.25}}


# --------------------------------------------------------------------------- #
# Bridge (Appendix A.1)
# --------------------------------------------------------------------------- #


def test_bridge_fit_by_hand(result):
    # Methods with both the representative group and another one:
    # AlpaGasus, SuperFiltering (same-model bench), InsTag, DEITA (other-model bench).
    x = [0.949, 0.962, 0.985, 1.000]
    y = [1.284, 1.475, 1.344, 1.467]
    mx, my = sum(x) / 4, sum(y) / 4
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    intercept = my - slope * mx
    fit = result.bridge
    assert fit.fitted_methods == ("AlpaGasus", "DEITA", "InsTag", "SuperFiltering")
    assert fit.slope == pytest.approx(slope) == pytest.approx(1.99617, abs=1e-5)
    assert fit.intercept == pytest.approx(intercept) == pytest.approx(-0.55177, abs=1e-5)


def test_bridge_estimates_next_to_the_surveys(result):
    est = {e.method: e for e in result.bridge_estimates}
    less, im = est["LESS"], est["Instruction-Mining"]
    slope, intercept = result.bridge.slope, result.bridge.intercept
    assert less.estimate == pytest.approx(slope * 0.973 + intercept) == pytest.approx(1.3905, abs=1e-4)
    assert im.estimate == pytest.approx(slope * 0.991 + intercept) == pytest.approx(1.4264, abs=1e-4)
    # Reported honestly: the pooled bridge does NOT reproduce the survey's (1.570).
    assert less.survey_value == 1.570 and less.difference == pytest.approx(-0.1795, abs=1e-4)
    assert im.survey_value == 1.400 and im.difference == pytest.approx(0.0264, abs=1e-4)
    # The wins-vs-other-models ratio (0.212) has no fitted bridge and is not used.
    assert im.ignored_groups == ("other_models_wins",)
    assert any("1.570" in f for f in result.findings)


def test_per_group_bridge_comes_close_to_the_surveys_estimates(result):
    # One coefficient per group with blanks read as 0 gets within ~0.01 of the
    # survey's parenthesised values; kept as an alternative, not the default.
    alt = {e.method: e for e in result.alternative_estimates}
    assert alt["LESS"].estimate == pytest.approx(1.570, abs=0.01)
    assert alt["Instruction-Mining"].estimate == pytest.approx(1.400, abs=0.015)


# --------------------------------------------------------------------------- #
# Baseline, distances, ranking
# --------------------------------------------------------------------------- #


def test_signed_distance_of_ifd_by_hand(result):
    pir_im = result.method("Instruction-Mining").pir
    x_im, x_ig = 2532 / 100000, 200 / 3439
    slope = (1.443 - pir_im) / (x_ig - x_im)
    intercept = pir_im - slope * x_im
    x_ifd = 5200 / 52002  # 10% of Alpaca
    gap = 1.747 - (slope * x_ifd + intercept)
    expected = gap / math.sqrt(1 + slope**2)  # perpendicular distance, positive above
    ifd = result.method("IFD")
    assert ifd.sdf == pytest.approx(x_ifd)
    assert ifd.vertical_gap == pytest.approx(gap)
    assert ifd.signed_distance == pytest.approx(expected) == pytest.approx(0.2526, abs=1e-4)
    assert ifd.position == "superior"
    for ref in ("Instruction-Mining", "InstructionGPT-4"):
        assert result.method(ref).signed_distance == pytest.approx(0.0, abs=1e-12)


def test_survey_sec_6_3_ifd_best_alpagasus_worst(result):
    assert result.ranking[0] == "IFD"
    assert result.ranking[-1] == "AlpaGasus"
    assert result.method("AlpaGasus").position == "inferior"
    checks = {c.source + c.claim[:3]: c.holds for c in result.survey_checks}
    assert checks == {"Sec. 6.3IFD": True, "Sec. 6.3Alp": True, "Appendix A.3All": False}


def test_appendix_a3_incomparable_pairs_as_they_actually_hold(result):
    # The survey says only DEITA lies in InsTag's infeasible area. With sizes from
    # the methods' own papers DEITA (6K/306K) and InsTag (6K/306,044) share an
    # SDF of 0.0196, DEITA straight above InsTag: InsTag is inferior, and an
    # inferior area only spans slopes between 0 and the baseline's, so DEITA is
    # not in it; the reverse holds (DEITA is superior and left of
    # Instruction-Mining, so its area reaches up to the vertical). IFD is steeply
    # up-right of DEITA and Nuggets, inside their areas and they inside IFD's.
    # This is a reported discrepancy, not something to tune away.
    assert ("DEITA", "InsTag") not in result.incomparable_pairs
    assert set(result.incomparable_pairs) == {
        ("InsTag", "DEITA"),
        ("DEITA", "IFD"),
        ("IFD", "DEITA"),
        ("Nuggets", "IFD"),
        ("IFD", "Nuggets"),
    }
    assert [c.source for c in result.discrepancies] == ["Appendix A.3"]


def test_infeasible_area_shapes(result):
    les = result.method("LESS").infeasible  # inferior: horizontal + parallel to the baseline
    assert (les.slope_low, les.slope_high) == (0.0, pytest.approx(result.baseline.slope))
    x, y = les.apex
    assert les.contains(x + 0.01, y + 0.001)  # right, between the two lines
    assert les.contains(x - 0.01, y - 0.001)  # and the opposite sector on the left
    assert not les.contains(x + 0.01, y + 0.5)
    ifd = result.method("IFD").infeasible  # superior, right of Instruction-Mining
    im = result.method("Instruction-Mining")
    assert ifd.slope_high == pytest.approx((1.747 - im.pir) / (5200 / 52002 - im.sdf))
    assert math.isinf(result.method("Nuggets").infeasible.slope_high)  # superior, left of the anchor
    assert all(len(m.infeasible.polygons) >= 1 for m in result.methods)


def test_reference_methods_are_configurable_and_must_exist():
    points = load_points()
    alt = compute_efficiency(points, reference=("InstructionGPT-4", "AlpaGasus"))
    assert alt.method("AlpaGasus").signed_distance == pytest.approx(0.0, abs=1e-12)
    assert alt.survey_checks == ()  # the survey's conclusions assume its own baseline
    with pytest.raises(EfficiencyError, match="reference method 'Nope'"):
        compute_efficiency(points, reference=("Nope", "IFD"))


def test_log_scale_is_optional_and_keeps_the_conclusions():
    res = compute_efficiency(load_points(), x_scale="log")
    assert res.baseline.x_scale == "log"
    assert res.ranking[0] == "IFD" and res.ranking[-1] == "AlpaGasus"


# --------------------------------------------------------------------------- #
# Your own recipe as a point
# --------------------------------------------------------------------------- #


def test_user_recipe_is_placed_among_the_published_methods():
    points = load_points([MY_RECIPE])
    res = compute_efficiency(points)
    mine = res.method("my-recipe")
    assert not mine.published and mine.sdf == pytest.approx(0.1)
    assert mine.pir == pytest.approx(1.50)  # Eq. 1: mean of 1.52 and 1.48
    assert mine.position == "superior"
    assert "my-recipe (yours)" in efficiency_markdown(res)
    assert res.discrepancies[0].source == "Appendix A.3"  # user rows don't create new ones
    only_mine = load_points([MY_RECIPE], include_published=False)
    with pytest.raises(EfficiencyError, match="reference method"):
        compute_efficiency(only_mine)


# --------------------------------------------------------------------------- #
# Bad points files
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"source": ""}, "source", "missing (required)"),
        ({"group": "same_wins"}, "group", "unknown group"),
        ({"value": "high"}, "value", "expected a number"),
        ({"value": -1}, "value", "> 0"),
        ({"selected_size": 1.5}, "selected_size", "positive integer"),
        ({"selected_size": 200}, "selected_size", "exceeds pool_size"),
        ({"confirmed": "maybe"}, "confirmed", "true/false"),
        ({"pool": 3}, "pool", "unknown field"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, overrides, field, message):
    path = write_json(tmp_path, [row(), row(**overrides)])
    with pytest.raises(DataError) as info:
        load_points_file(path)
    problem = info.value.problems[0]
    assert (problem.file, problem.row, problem.field) == (str(path), 2, field)
    assert message in problem.message
    assert f"{path}: row 2: field '{field}'" in str(info.value)


def test_bad_csv_and_file_level_errors(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text(
        "method,sem,counterpart,group,value,selected_size,pool_size,source\n"
        "M,s,BM,same_model_wins,1.2,ten,100,x\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError, match=r"row 1: field 'selected_size'"):
        load_points_file(csv_path)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        load_points_file(broken)
    with pytest.raises(DataError, match="unsupported points file type"):
        load_points_file(tmp_path / "p.txt")
    with pytest.raises(DataError, match="cannot read"):
        load_points_file(tmp_path / "missing.json")


def test_conflicting_sizes_for_one_method(tmp_path):
    path = write_json(tmp_path, [row(), row(group="same_model_bench", pool_size=200)])
    with pytest.raises(DataError, match="conflicting dataset sizes") as info:
        load_points([path], include_published=False)
    assert info.value.problems[0].row == 2


# --------------------------------------------------------------------------- #
# Output
# --------------------------------------------------------------------------- #


def test_markdown_and_json(result):
    text = efficiency_markdown(result)
    assert "| Rank | Method | PIR | SDF | Signed distance |" in text
    assert "1.391 (bridge)" in text and "DOES NOT HOLD" in text
    data = json.loads(json.dumps(efficiency_json(result)))
    assert data["ranking"][0] == "IFD"
    assert data["bridge"]["fitted_methods"] == ["AlpaGasus", "DEITA", "InsTag", "SuperFiltering"]
    nuggets = next(m for m in data["methods"] if m["method"] == "Nuggets")
    assert nuggets["infeasible_area"]["slope_high"] is None
    assert nuggets["infeasible_area"]["slope_high_unbounded"] is True
    assert "Appendix A.3" in " ".join(data["findings"])


def test_plot_renders_png_and_svg_and_html(tmp_path, result):
    from matplotlib import image

    png = plot_efficiency(result, tmp_path / "eff.png")
    pixels = image.imread(png)
    assert pixels.shape[:2] == (900, 1350)
    assert pixels.var() > 0
    svg = plot_efficiency(result, tmp_path / "eff.svg")
    fragment = efficiency_html_section(result, svg)
    assert fragment.startswith('<section class="efficiency">') and "<svg" in fragment and "<?xml" not in fragment
    assert "<td>IFD</td>" in fragment
    assert 'src="data:image/png;base64,' in efficiency_html_section(result, png)
    with pytest.raises(Exception, match="png or .svg"):
        plot_efficiency(result, tmp_path / "eff.jpg")


def test_run_efficiency_for_the_cli(tmp_path):
    out = run_efficiency([MY_RECIPE], as_json=True, plot=tmp_path / "e.png")
    assert json.loads(out)["methods"] and (tmp_path / "e.png").stat().st_size > 0


HEADER = "method,sem,counterpart,group,value,selected_size,pool_size,source\n"


def test_points_file_that_is_not_utf8_is_located(tmp_path):
    csv_path = tmp_path / "latin1.csv"
    csv_path.write_bytes(HEADER.encode() + "Caf\u00e9,s,BM,same_model_wins,1.2,10,100,x\n".encode("latin-1"))
    with pytest.raises(DataError) as info:
        load_points_file(csv_path)
    message = str(info.value)
    assert message.startswith(f"{csv_path}: ") and "not UTF-8" in message
    assert "byte 0xe9 at line 2, column 4" in message
    json_path = tmp_path / "bad.json"
    json_path.write_bytes(b'[\n  {"method": "\xff"}\n]')
    with pytest.raises(DataError, match=r"bad.json: points file is not UTF-8 text: byte 0xff at line 2, column 15 \(byte 16\)"):
        load_points_file(json_path)
    with pytest.raises(DataError, match="not UTF-8"):
        run_efficiency([csv_path])


def test_points_csv_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + "M,s,BM,same_model_wins,1.2,10,100,x\n").encode())
    (point,) = load_points_file(path)
    assert point.method == "M"


def test_html_section_reads_a_non_utf8_svg_as_an_error(tmp_path, result):
    svg = tmp_path / "plot.svg"
    svg.write_bytes(b"<svg>\xff</svg>")
    with pytest.raises(DataError, match=r"plot.svg: plot is not UTF-8 text: byte 0xff at line 1, column 6"):
        efficiency_html_section(result, svg)


# --------------------------------------------------------------------------- #
# Infeasible areas on demand, your points apart from the published ones
# --------------------------------------------------------------------------- #


def _same_as_ifd(tmp_path: Path) -> Path:
    """A user point exactly on IFD's published point (SDF 5,200 / 52,002, PIR 1.747)."""
    return write_json(tmp_path, [row(method="my-ifd", value=1.747, selected_size=5200, pool_size=52002)], "mine.json")


def test_no_infeasible_area_is_drawn_unless_asked(tmp_path, result):
    svg = plot_efficiency(result, tmp_path / "none.svg").read_text(encoding="utf-8")
    assert 'id="infeasible-area-' not in svg
    assert "<!-- infeasible areas: none drawn (- -areas METHOD draws one) -->" in svg  # ("--" is escaped in SVG comments)


def test_areas_asked_for_are_drawn_apart_and_named_in_the_legend(tmp_path, result):
    svg = plot_efficiency(result, tmp_path / "two.svg", areas=["IFD", "deita"]).read_text(encoding="utf-8")
    assert 'id="infeasible-area-IFD"' in svg and 'id="infeasible-area-DEITA"' in svg  # case is forgiven
    assert 'id="infeasible-area-Nuggets"' not in svg
    assert "<!-- infeasible area of IFD (holds DEITA, Nuggets) -->" in svg
    assert "<!-- infeasible area of DEITA (holds IFD, InsTag) -->" in svg
    assert "none drawn" not in svg
    # each its own hatch (two patterns), so stacked areas can be told apart
    assert svg.count("<pattern ") >= 2


def test_an_unknown_area_name_suggests_the_closest_method(tmp_path, result):
    with pytest.raises(EfficiencyError, match=r"--areas IDF: no such method on the graph; did you mean `IFD`\?"):
        plot_efficiency(result, tmp_path / "typo.svg", areas=["IDF"])
    assert not (tmp_path / "typo.svg").exists()
    with pytest.raises(EfficiencyError, match="--areas"):
        run_efficiency(None, plot=tmp_path / "typo.svg", areas=["nope"])
    with pytest.raises(TamisError, match="add --plot"):
        run_efficiency(None, areas=["IFD"])


def test_a_user_point_on_a_published_one_stays_visible_and_apart(tmp_path):
    res = compute_efficiency(load_points([_same_as_ifd(tmp_path)]))
    mine, ifd = res.method("my-ifd"), res.method("IFD")
    assert (mine.x, mine.pir) == pytest.approx((ifd.x, ifd.pir))
    svg = plot_efficiency(res, tmp_path / "mine.svg").read_text(encoding="utf-8")
    assert 'id="your-point-my-ifd"' in svg and 'id="published-point-IFD"' in svg
    assert 'id="your-point-IFD"' not in svg and 'id="published-point-my-ifd"' not in svg
    assert "<!-- yours: my-ifd -->" in svg and "<!-- published method -->" in svg
    assert "<!-- my-ifd (yours) -->" in svg  # labelled with its name

    def centre(gid: str) -> tuple[float, float]:  # the marker's position in the SVG (a <use> in its group)
        group = svg[svg.index(f'id="{gid}"'):]
        m = re.search(r'<use [^>]*x="([-\d.]+)" y="([-\d.]+)"', group)
        return float(m.group(1)), float(m.group(2))

    (ux, uy), (px, py) = centre("your-point-my-ifd"), centre("published-point-IFD")
    assert math.hypot(ux - px, uy - py) >= 10  # moved aside (a leader line leads to its true place)


def test_a_user_point_away_from_the_others_is_not_moved(tmp_path):
    from matplotlib.figure import Figure

    from tamis.report.efficiency_cli import _nudge_user_points

    res = compute_efficiency(load_points([MY_RECIPE]))
    fig = Figure(figsize=(9, 6), dpi=150)
    ax = fig.add_subplot()
    x0, x1, y0, y1 = res.bounds
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    assert _nudge_user_points(ax, res.methods, fig.dpi) == {}
    fake = compute_efficiency(load_points([_same_as_ifd(tmp_path)]))
    assert set(_nudge_user_points(ax, fake.methods, fig.dpi)) == {"my-ifd"}


def test_cli_areas_option_on_efficiency_and_report(tmp_path):
    from typer.testing import CliRunner

    from tamis.cli import app

    runner = CliRunner()
    plot = tmp_path / "e.svg"
    res = runner.invoke(app, ["efficiency", "--plot", str(plot), "--areas", "Nuggets"])
    assert res.exit_code == 0, res.output
    assert 'id="infeasible-area-Nuggets"' in plot.read_text(encoding="utf-8")
    res = runner.invoke(app, ["efficiency", "--plot", str(plot), "--areas", "Nugets"])
    assert res.exit_code == 1 and "did you mean `Nuggets`?" in res.output
    page = tmp_path / "r.html"
    res = runner.invoke(app, ["report", "ifd", "--html", str(page), "--points", str(MY_RECIPE), "--areas", "IFD"])
    assert res.exit_code == 0, res.output
    html_text = page.read_text(encoding="utf-8")
    assert 'id="infeasible-area-IFD"' in html_text and 'id="your-point-my-recipe"' in html_text
    res = runner.invoke(app, ["report", "ifd", "--html", str(tmp_path / "r2.html"), "--areas", "IDF"])
    assert res.exit_code == 1 and "did you mean `IFD`?" in res.output and not (tmp_path / "r2.html").exists()
