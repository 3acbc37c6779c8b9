"""The `tamis` command line: check, explain, feasibility, efficiency, report, run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tamis.errors import DataError, TamisError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="tamis: a declarative language and compiler for LLM data-selection recipes.",
    pretty_exceptions_enable=False,
)

RecipeArgs = Annotated[list[str], typer.Argument(help="recipe files, or names of built-in recipes (e.g. ifd)")]
ParamOpt = Annotated[Optional[list[str]], typer.Option(
    "--param", help="a value for one of the recipe's parameters, written as in the recipe: --param size=5% "
                    '(repeatable; see `recipe NAME(size = 10%)`)')]
PluginOpt = Annotated[Optional[list[Path]], typer.Option(
    "--plugins", help="a Python file of your own operators (repeatable); installed packages' "
                      "`tamis.plugins` entry points load too")]


EngineOpt = Annotated[str, typer.Option(
    "--engine", help="local (this process), or ray: row-wise scorers as Ray Data pipelines (pip install 'tamis[ray]')")]


def _version(value: bool) -> None:
    if value:
        from tamis import __version__

        typer.echo(f"tamis {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """tamis: a declarative language and compiler for LLM data-selection recipes."""
    import warnings

    # the model libraries' deprecation notices are for their API's users (tamis), not for yours
    for module in ("transformers", "peft"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)


def _fail(err: TamisError) -> None:
    typer.echo(str(err), err=True)
    raise typer.Exit(1)


def _load_plugins(plugins: Optional[list[Path]]) -> None:
    """User operators: only ever from a flag or an installed package, never from a recipe."""
    from tamis.plugins import load_plugins

    try:
        load_plugins(plugins or [])
    except TamisError as err:
        _fail(err)


def _warn(compiled) -> None:
    for w in compiled.graph.graph.get("warnings", []):
        typer.echo(f"warning: {w}", err=True)


def _compile_all(recipes: list[str], pool_fields: dict[str, str] | None = None, params: dict[str, str] | None = None):
    from tamis.dsl.compile import compile_file

    out, errors = [], []
    for r in recipes:
        try:
            out.append(compile_file(r, pool_fields=pool_fields, params=params))
            _warn(out[-1])
        except TamisError as err:
            errors.append(err)
    return out, errors


def _pool_fields(pool: str | None, pool_format: str = "auto", columns: dict[str, str] | None = None):
    """The pool's own fields and their recipe column types, read from its schema (never the whole file)."""
    if pool is None:
        return None
    from tamis.dsl.compile import pool_column_types
    from tamis.runtime.data import pool_schema

    return pool_column_types(pool_schema(pool, format=pool_format, columns=columns or None))


def _check_outputs(outputs: dict, inputs: list) -> None:
    """Every output path checked before any work (see `tamis.runtime.outputs.check_outputs`)."""
    from tamis.runtime.outputs import check_outputs

    try:
        check_outputs({k: Path(v) for k, v in outputs.items() if v is not None and str(v) != "-"},
                      [Path(i) for i in inputs if i is not None])
    except TamisError as err:
        _fail(err)


def _inputs_of(compiled: list) -> list[Path]:
    """The files a set of compiled recipes read: their own files, those they splice, and the
    datasets they `load`."""
    loads = [a["params"]["path"] for c in compiled for _, a in c.graph.nodes(data=True)
             if a.get("kind") == "dataset" and a.get("source") == "load" and a.get("params", {}).get("path")]
    return [Path(p) for c in compiled for p in [c.recipe.path, *(u["path"] for u in c.graph.graph.get("uses", []))]
            if p] + [Path(p) for p in loads]


def _compile_or_exit(recipes: list[str]):
    compiled, errors = _compile_all(recipes)
    if errors:
        for err in errors:
            typer.echo(str(err) + "\n", err=True)
        raise typer.Exit(1)
    return compiled


@app.command()
def check(
    recipes: RecipeArgs,
    pool: Annotated[Optional[str], typer.Option("--pool", help="check column names against this pool's own fields "
                                                "(read from its schema, not loaded)")] = None,
    pool_format: Annotated[str, typer.Option("--format", help="the pool's format when its extension does not say")] = "auto",
    column: Annotated[Optional[list[str]], typer.Option("--column", help="map a field: --column prompt=instruction")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="warnings are errors (exit 1)")] = False,
    param: ParamOpt = None,
    plugins: PluginOpt = None,
) -> None:
    """Check recipes: syntax, names, types, columns, composition. Exit 1 with located errors.

    Without --pool, a name no stage produces is taken to be a field of the pool (listed here, and
    checked when `run` reads the pool, before any model work)."""
    _load_plugins(plugins)
    try:
        fields = _pool_fields(pool, pool_format, _pairs("--column", column, "--column prompt=instruction"))
    except TamisError as err:
        _fail(err)
    compiled, errors = _compile_all(recipes, fields, _pairs("--param", param, "--param size=5%"))
    for err in errors:
        typer.echo(str(err) + "\n", err=True)
    warned = False
    for c in compiled:
        assumed = sorted({f["name"] for f in c.graph.graph.get("assumed_fields", [])})
        note = f"; pool fields assumed: {', '.join(assumed)} (check them with --pool FILE)" if assumed else ""
        typer.echo(f"{c.recipe.path}: ok ({c.graph.number_of_nodes()} nodes{note})")
        warned = warned or bool(c.graph.graph.get("warnings"))
    if errors or (strict and warned):
        raise typer.Exit(1)


@app.command()
def explain(
    recipe: Annotated[str, typer.Argument(help="a recipe file or built-in name")],
    as_json: Annotated[bool, typer.Option("--json", help="node-link JSON of the optimised graph")] = False,
    dot: Annotated[Optional[Path], typer.Option("--dot", help="write Graphviz DOT text to this file ('-' for stdout)")] = None,
    logical: Annotated[bool, typer.Option("--logical", help="the graph before optimisation passes")] = False,
    engine: EngineOpt = "local",
    plugins: PluginOpt = None,
) -> None:
    """Print the compiled operator graph, before anything runs: operators, their kernels and resources."""
    _load_plugins(plugins)
    from tamis.dsl.compile import compile_file
    from tamis.dsl.explain import graph_dot, graph_json, plan_text

    try:
        c = compile_file(recipe)
    except TamisError as err:
        _fail(err)
    _warn(c)
    _check_outputs({"--dot": dot}, _inputs_of([c]) + (plugins or []))
    g = c.logical if logical else c.graph
    if dot is not None:
        text = graph_dot(g)
        if str(dot) == "-":
            typer.echo(text)
        else:
            from tamis.runtime.outputs import write_text

            write_text(text, dot)
            typer.echo(f"wrote {dot}", err=True)
        return
    if as_json:
        typer.echo(json.dumps(graph_json(g), indent=2))
    else:
        typer.echo(plan_text(g, engine=_engine(engine)))


@app.command()
def ops(
    name: Annotated[Optional[str], typer.Argument(help="one operator's name, for its details")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="a list of objects")] = False,
    plugins: PluginOpt = None,
) -> None:
    """Every scorer, sampler, function, model and data constructor, with parameters and docs."""
    from tamis.dsl.lower import did_you_mean
    from tamis.report import catalog

    _load_plugins(plugins)
    items = catalog.entries()
    if name is not None:
        items = [e for e in items if e["name"] == name]
        if not items:
            hint = did_you_mean(name, [e["name"] for e in catalog.entries()])
            typer.echo(f"no operator {name!r}" + (f"; {hint}" if hint else ""), err=True)
            raise typer.Exit(1)
    typer.echo(json.dumps(items, indent=2, default=str) if as_json else catalog.text(items, detail=name is not None))


@app.command()
def feasibility(
    recipes: RecipeArgs,
    as_json: Annotated[bool, typer.Option("--json", help="a list of objects, one per recipe")] = False,
    html_out: Annotated[Optional[Path], typer.Option("--html", help="write an HTML page with the table and each graph")] = None,
    plugins: PluginOpt = None,
) -> None:
    """The survey's Table 3 (feasibility), derived from the recipes' graphs; ranks over the recipes given."""
    _load_plugins(plugins)
    from tamis.report import feasibility_report as fr

    compiled = _compile_or_exit(recipes)
    _check_outputs({"--html": html_out}, _inputs_of(compiled) + (plugins or []))
    rows = fr.table(compiled)
    if html_out is not None:
        from tamis.runtime.outputs import write_text

        write_text(fr.html_page(compiled, rows), html_out)
        typer.echo(f"wrote {html_out}", err=True)
    typer.echo(json.dumps(fr.as_json(rows), indent=2) if as_json else fr.markdown(rows))


AreasOpt = Annotated[Optional[list[str]], typer.Option(
    "--areas", metavar="METHOD", help="draw this method's infeasible area on the graph (repeatable; none by default)")]


@app.command()
def efficiency(
    points: Annotated[Optional[list[Path]], typer.Argument(help="points files (CSV or JSON); default: the published points")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="draw the efficiency graph to FILE.png or FILE.svg")] = None,
    areas: AreasOpt = None,
) -> None:
    """The survey's efficiency comparison: PIR, SDF, signed distance to the baseline, infeasible areas."""
    from tamis.report.efficiency_cli import run_efficiency

    _check_outputs({"--plot": plot}, list(points or []))
    try:
        typer.echo(run_efficiency(points or None, as_json=as_json, plot=plot, areas=areas or ()))
    except TamisError as err:
        _fail(err)


@app.command()
def report(
    recipes: RecipeArgs,
    html_out: Annotated[Path, typer.Option("--html", help="the page to write")],
    points: Annotated[Optional[list[Path]], typer.Option("--points", help="points files; default: the published points")] = None,
    areas: AreasOpt = None,
    plugins: PluginOpt = None,
) -> None:
    """One HTML page: the feasibility table, each recipe's graph, and the efficiency graph."""
    _load_plugins(plugins)
    import tempfile

    from tamis.report import feasibility_report as fr
    from tamis.runtime.outputs import write_text
    from tamis.report.efficiency import area_methods, compute_efficiency, load_points
    from tamis.report.efficiency_cli import efficiency_html_section, plot_efficiency

    compiled = _compile_or_exit(recipes)
    _check_outputs({"--html": html_out}, _inputs_of(compiled) + list(points or []) + (plugins or []))
    try:
        result = compute_efficiency(load_points(points or None))
        area_methods(result, areas or ())  # a typo fails before the page is written
    except TamisError as err:
        _fail(err)
    with tempfile.TemporaryDirectory() as tmp:
        svg = Path(tmp) / "efficiency.svg"
        plot_efficiency(result, svg, areas=areas or ())
        section = efficiency_html_section(result, svg.read_text(encoding="utf-8"))
    rows = fr.table(compiled)
    write_text(fr.html_page(compiled, rows, [section]), html_out)
    typer.echo(f"wrote {html_out}")


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help="a recipe file or built-in name")],
    pool: Annotated[str, typer.Option("--pool", help="candidate pool: Alpaca JSON, JSONL, Parquet or ShareGPT")],
    output: Annotated[Path, typer.Option("-o", "--output", help="selected rows in rank order: .jsonl, .json or .parquet")],
    pfm: Annotated[Optional[str], typer.Option("--pfm", help="the pending fine-tune model: folder, .gguf, or cached hub name")] = None,
    scores: Annotated[Optional[Path], typer.Option("--scores", help="every candidate's id and computed columns: .parquet, .jsonl or .json")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 …")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 where the hardware is fast at it), fp32, bf16, fp16")] = "auto",
    cache_dir: Annotated[Optional[str], typer.Option(help="cache root (default $TAMIS_CACHE_DIR or ~/.cache/tamis)")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="neither read nor write the cache")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="skip bad pool rows (counted in the report) instead of failing")] = False,
    limit: Annotated[Optional[int], typer.Option(help="read only the first N pool rows")] = None,
    pool_format: Annotated[str, typer.Option("--format", help="the pool's format when its extension does not say: auto, "
                                             "json, alpaca, jsonl, sharegpt, parquet, csv, tsv, arrow, feather, ipc, "
                                             "hf (a `datasets` save_to_disk folder)")] = "auto",
    column: Annotated[Optional[list[str]], typer.Option("--column", help="map a field: --column prompt=instruction")] = None,
    model: Annotated[Optional[list[str]], typer.Option("--model", help="serve a recipe's hf(\"NAME\") or api(\"NAME\") from a local path: --model gpt2=/models/gpt2")] = None,
    api_base: Annotated[Optional[str], typer.Option("--api-base", help="OpenAI-compatible endpoint for api(\"NAME\") models (default $OPENAI_BASE_URL; key from $OPENAI_API_KEY)")] = None,
    batch_tokens: Annotated[Optional[int], typer.Option(help="padded tokens per scoring batch")] = None,
    progress: Annotated[bool, typer.Option(help="progress bars")] = True,
    api_max_wait: Annotated[float, typer.Option(min=0, help="endpoint judges: the most seconds of retry waits one request may spend")] = 120.0,
    api_max_failures: Annotated[int, typer.Option(min=1, help="endpoint judges: stop after this many failed requests in a row (rated rows are kept)")] = 3,
    checkpoint_rows: Annotated[int, typer.Option(min=1, help="persist scores to the cache at least every N rows")] = 64,
    checkpoint_seconds: Annotated[float, typer.Option(min=0.1, help="… and about every S seconds of scoring (a kill loses at most that)")] = 30.0,
    engine: EngineOpt = "local",
    address: Annotated[Optional[str], typer.Option("--address", help="--engine ray: a Ray cluster's address (default: start a local instance)")] = None,
    concurrency: Annotated[Optional[int], typer.Option("--concurrency", min=1, help="--engine ray: actors per model stage (default: one per GPU, else one), or tasks in flight")] = None,
    train_cpus: Annotated[Optional[int], typer.Option("--train-cpus", min=1, help="--engine ray: CPUs per training task (probes; default 1, or a GPU's share of the CPUs)")] = None,
    param: ParamOpt = None,
    plugins: PluginOpt = None,
) -> None:
    """Run a recipe over a pool: score, pick, write the selection, the scores and a run report."""
    _load_plugins(plugins)

    from tamis.dsl.compile import compile_file
    from tamis.report import run_report
    from tamis.runtime.executor import LocalExecutor, RunConfig
    from tamis.runtime.outputs import check_outputs, frame_writer, write_output_set

    mapping = _pairs("--column", column, "--column prompt=instruction")
    model_paths = _pairs("--model", model, "--model gpt-3.5-turbo=/models/judge")
    cfg = RunConfig(pool=pool, pfm=pfm, device=device, dtype=dtype, cache_dir=cache_dir, no_cache=no_cache,
                    skip_bad=skip_bad, limit=limit, pool_format=pool_format, columns=mapping or None, batch_tokens=batch_tokens, progress=progress,
                    model_paths=model_paths, api_base=api_base, chunk_rows=checkpoint_rows,
                    checkpoint_seconds=checkpoint_seconds, api_max_wait=api_max_wait, api_max_failures=api_max_failures)
    base = output.with_suffix("")
    report_json, report_md = base.with_name(base.name + ".report.json"), base.with_name(base.name + ".report.md")
    try:
        try:  # the pool's fields, so that names are checked at their line now; a bad pool is the load's to report
            fields = _pool_fields(pool, pool_format, mapping)
        except DataError:
            fields = None
        compiled = compile_file(recipe, pool_fields=fields, params=_pairs("--param", param, "--param size=5%"))
        _warn(compiled)
        outputs = {"-o": output, "-o (report)": report_md, "-o (report manifest)": report_json,
                   **({"--scores": scores} if scores is not None else {})}
        # every file the run reads: the pool, plug-ins, the recipe, what it splices and the datasets it loads
        check_outputs(outputs, [Path(pool), Path(compiled.recipe.path or recipe), *(plugins or []),
                                *_inputs_of([compiled])])
        write_selection = frame_writer(output, "-o")
        write_scores = frame_writer(scores, "--scores") if scores is not None else None
        if _engine(engine) == "ray":
            from tamis.runtime.ray_engine import RayExecutor, RayOptions

            result = RayExecutor(compiled.graph, cfg, RayOptions(address=address, concurrency=concurrency,
                                                                 train_cpus=train_cpus)).run()
        else:
            result = LocalExecutor(compiled.graph, cfg).run()
    except TamisError as err:
        _fail(err)
    for warning in result.pool_report.get("warnings", []):
        typer.echo(f"warning: {pool}: {warning}", err=True)
    report = run_report.as_dict(result, compiled.name, cfg)
    writers = [(output, write_selection(result.selected)),
               *([(scores, write_scores(result.scores))] if write_scores is not None else []),
               (report_md, lambda tmp: tmp.write_text(run_report.markdown(report), encoding="utf-8"))]
    write_output_set(writers, report_json, lambda digests: {**report, "outputs": digests})
    for node, m in result.models.items():
        if m.get("dtype_reason"):
            typer.echo(f"model {m['label']}: {m['device']}, {m['dtype']} ({m['dtype_reason']})", err=True)
    for stage in result.stages:
        if stage.skipped:  # rows a scorer gave no value: say how many and why, not only in the report
            n = sum(stage.skipped.values())
            why = ", ".join(f"{reason}: {count}" for reason, count in stage.skipped.items())
            hint = ("; a larger max_length (`with max_length=…`) scores more of them"
                    if any("max_length" in r for r in stage.skipped) else "")
            of = f"{stage.target_rows} rows of {stage.target}" if stage.target else f"{stage.rows_in} rows"
            typer.echo(f"note: `{stage.label}`: {n} of {of} have no score ({why}){hint}", err=True)
        for note in stage.notes:
            typer.echo(f"note: `{stage.label}`: {note}", err=True)
    typer.echo(f"selected {result.selected.height} of {report['pool_load'].get('rows_loaded')} rows in {result.seconds:.1f} s")
    typer.echo(f"  selection: {output}")
    if scores is not None:
        typer.echo(f"  scores:    {scores}")
    typer.echo(f"  report:    {report_md} (and {report_json.name}, written last: it lists every output's SHA-256)")


def _engine(name: str) -> str:
    if name not in ("local", "ray"):
        _fail(TamisError(f"--engine {name!r}: choose local or ray"))
    return name


def _pairs(flag: str, values: Optional[list[str]], example: str) -> dict[str, str]:
    """NAME=VALUE options as a dict; anything else is a usage error that shows the form."""
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, value = v.partition("=")
        if not sep or not name or not value:
            raise typer.BadParameter(f"{v!r} is not NAME=VALUE, e.g. {example}", param_hint=flag)
        out[name] = value
    return out


@app.command()
def evaluate(
    recipes: Annotated[list[str], typer.Argument(help="recipe files or built-in names; `random` (the control every "
                                                      "recipe gets: a random subset of its selection's size) is accepted")],
    pool: Annotated[str, typer.Option("--pool", help="candidate pool (as for `tamis run`)")],
    pfm: Annotated[str, typer.Option("--pfm", help="the model to fine-tune: folder, .gguf, or cached hub name")],
    eval_set: Annotated[str, typer.Option("--eval", help="evaluation set: a file with reference answers, or "
                                          "holdout:N / holdout:P% (pool rows held out, never selected from)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="output folder: points.csv, report.md/.html/.json, figures")],
    judge: Annotated[Optional[str], typer.Option("--judge", help="pairwise judge: a local chat model (folder, .gguf, "
                                                 "hub name) or api:NAME (an endpoint, see --api-base)")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="train every model with this many seeds (the spread of PIR)")] = 3,
    seed: Annotated[int, typer.Option(help="the first seed (seed i is SEED+i); also draws the holdout")] = 42,
    method: Annotated[str, typer.Option("--method", help="lora or full (fine-tuning), the same for every model")] = "lora",
    epochs: Annotated[int, typer.Option(min=1, help="epochs, the same for every model")] = 3,
    lr: Annotated[float, typer.Option(help="learning rate (linear schedule, 3% warmup)")] = 1e-4,
    batch: Annotated[int, typer.Option(min=1, help="effective batch (rows per optimizer step)")] = 16,
    max_length: Annotated[int, typer.Option(min=2, help="tokens per training/evaluation sequence")] = 512,
    lora_r: Annotated[int, typer.Option(min=1)] = 8,
    lora_alpha: Annotated[int, typer.Option(min=1)] = 16,
    template: Annotated[str, typer.Option(help="prompt template for training, loss and answers: alpaca, chat, bare, none")] = "alpaca",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="longest generated answer (judge only)")] = 256,
    lm_eval: Annotated[Optional[str], typer.Option("--lm-eval", help="lm-evaluation-harness tasks, comma-separated "
                                                   "(optional dependency: skipped, with a note, when not installed)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON report on stdout")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 …")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, fp32, bf16, fp16")] = "auto",
    cache_dir: Annotated[Optional[str], typer.Option(help="cache root (default $TAMIS_CACHE_DIR or ~/.cache/tamis)")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="neither read nor write the cache (everything is retrained)")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="skip bad pool rows instead of failing")] = False,
    limit: Annotated[Optional[int], typer.Option(help="read only the first N pool rows")] = None,
    pool_format: Annotated[str, typer.Option("--format", help="the pool's format when its extension does not say")] = "auto",
    column: Annotated[Optional[list[str]], typer.Option("--column", help="map a field: --column prompt=instruction")] = None,
    model: Annotated[Optional[list[str]], typer.Option("--model", help="serve hf/api(\"NAME\") from a local path: NAME=PATH")] = None,
    api_base: Annotated[Optional[str], typer.Option("--api-base", help="OpenAI-compatible endpoint for api models and --judge api:NAME")] = None,
    batch_tokens: Annotated[Optional[int], typer.Option(help="padded tokens per scoring batch")] = None,
    progress: Annotated[bool, typer.Option(help="progress bars")] = True,
    engine: EngineOpt = "local",
    address: Annotated[Optional[str], typer.Option("--address", help="--engine ray: a Ray cluster's address (default: start a local instance)")] = None,
    concurrency: Annotated[Optional[int], typer.Option("--concurrency", min=1, help="--engine ray: actors per model stage of the selections (default: one per GPU, else one)")] = None,
    train_cpus: Annotated[Optional[int], typer.Option("--train-cpus", min=1, help="--engine ray: CPUs per fine-tune task (default 1, or a GPU's share of the CPUs)")] = None,
    param: ParamOpt = None,
    plugins: PluginOpt = None,
) -> None:
    """Was the selection worth it? Fine-tune the PFM on each recipe's selection (SEM), on the whole pool
    (BM) and on a random subset of the same size, with identical settings and several seeds; score them
    (held-out answer loss, pairwise wins by a judge in both orders); write PIR, SDF, the points file of
    `tamis efficiency` and a report with plots. Trained models are cached: a rerun retrains nothing."""
    use_ray = _engine(engine) == "ray"
    _load_plugins(plugins)
    from tamis.evaluate.run import EvalConfig, TrainingSettings, evaluate as run_evaluation
    from tamis.report.evaluate_report import write_reports
    from tamis.runtime.executor import RunConfig

    if output.exists() and not output.is_dir():
        _fail(TamisError(f"-o {output}: exists and is not a folder"))
    names = ["points.csv", "report.md", "report.html", "report.json", "evaluate.png", "efficiency.png",
             "judgements.jsonl", "train_pool.parquet"]
    inputs = [Path(pool), Path(pfm), *(plugins or [])] + ([Path(eval_set)] if not eval_set.startswith("holdout:") else [])
    _check_outputs({f"-o ({n})": output / n for n in names}, [p for p in inputs if p.exists()])
    cfg = EvalConfig(
        recipes=list(recipes),
        run=RunConfig(pool=pool, pfm=pfm, device=device, dtype=dtype, cache_dir=cache_dir, no_cache=no_cache,
                      skip_bad=skip_bad, limit=limit, pool_format=pool_format,
                      columns=_pairs("--column", column, "--column prompt=instruction") or None,
                      batch_tokens=batch_tokens, progress=progress,
                      model_paths=_pairs("--model", model, "--model gpt2=/models/gpt2"), api_base=api_base),
        eval=eval_set, judge=judge, seeds=seeds, seed=seed,
        training=TrainingSettings(method=method, epochs=epochs, lr=lr, batch=batch, max_length=max_length,
                                  lora_r=lora_r, lora_alpha=lora_alpha, template=template),
        params=_pairs("--param", param, "--param size=5%"), max_new_tokens=max_new_tokens,
        lm_eval_tasks=[t.strip() for t in (lm_eval or "").split(",") if t.strip()],
    )
    if use_ray:  # the selections on the Ray engine, the missing fine-tunes as parallel Ray tasks
        from tamis.runtime.ray_engine import RayOptions

        cfg.ray = RayOptions(address=address, concurrency=concurrency, train_cpus=train_cpus)
    try:
        result = run_evaluation(cfg, output)
        files = write_reports(result, output)
    except TamisError as err:
        _fail(err)
    if as_json:
        typer.echo(files["report.json"].read_text(encoding="utf-8"))
        return
    from tamis.report.evaluate_report import PIR_HEADER, pir_rows

    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    trained = sum(m.method != "PFM" for m in result.models)
    typer.echo(f"evaluated {', '.join(cfg.recipes)} in {result.seconds:.1f} s ({trained} fine-tuned models)")
    typer.echo(" | ".join(PIR_HEADER))
    for row in pir_rows(result):
        typer.echo(" | ".join(row))
    for name in ("report.md", "points.csv", "evaluate.png", "efficiency.png"):
        if name in files:
            typer.echo(f"  {name:<15}{files[name]}")
    typer.echo(f"  place it among the published methods: tamis efficiency {files['points.csv']}")


cache_app = typer.Typer(no_args_is_help=True, help="What tamis stores (scores, warmups, model conversions): list it, clean it.")
app.add_typer(cache_app, name="cache")
CacheDirOpt = Annotated[Optional[str], typer.Option(
    "--cache-dir", help="cache root (default $TAMIS_CACHE_DIR or ~/.cache/tamis, as for `tamis run`)")]


@cache_app.command("list")
def cache_list(
    cache_dir: CacheDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="one object: entries (sizes in bytes) and totals")] = False,
) -> None:
    """One line per entry: kind, what it holds, rows, size and last use; totals at the end."""
    from tamis.runtime import cache_admin

    listing = cache_admin.list_cache(cache_dir)
    typer.echo(json.dumps(cache_admin.listing_json(listing), indent=2) if as_json
               else cache_admin.listing_text(listing))


@cache_app.command("clean")
def cache_clean(
    cache_dir: CacheDirOpt = None,
    older_than: Annotated[Optional[str], typer.Option(
        "--older-than", metavar="DURATION", help="remove entries last used longer ago than this: 90m, 12h, 30d, 2w")] = None,
    everything: Annotated[bool, typer.Option("--all", help="remove every entry, file-hashes.json included")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would be removed; remove nothing")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="what was removed, as JSON")] = False,
) -> None:
    """Remove whole entries: those unused for --older-than, or --all. Refuses a folder that is not a tamis cache."""
    from tamis.runtime import cache_admin

    if (older_than is None) != everything:  # a usage error (exit 2): name both flags
        typer.echo("tamis cache clean: " + ("say what to remove: --older-than DURATION (90m, 12h, 30d, 2w) or --all"
                                            if older_than is None else "give --older-than or --all, not both"), err=True)
        raise typer.Exit(2)
    try:
        seconds = cache_admin.parse_duration(older_than) if older_than is not None else None
    except TamisError as err:
        raise typer.BadParameter(str(err).removeprefix("--older-than: "), param_hint="--older-than") from err
    try:
        result = cache_admin.clean_cache(cache_dir, older_than=seconds, everything=everything, dry_run=dry_run)
    except TamisError as err:
        _fail(err)
    typer.echo(json.dumps(cache_admin.clean_json(result), indent=2) if as_json else cache_admin.clean_text(result))
    if result.failed:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
