"""Model constructors: how each kind of model in a recipe is bound and built at run time.

Built on the driver, once per run (a model shared by several stages is built once); a
trained model's weights are artifacts in the cache, so a re-run loads instead of training.
"""

from __future__ import annotations

from typing import Any, Mapping

from tamis.errors import ModelError
from tamis.ops.kernel import Built, BuildEnv, ExecOptions, Resources, kernel

_LLM = Resources(device="any", memory_per_row=0)


def describe_model(label: str, model: Any) -> dict[str, Any]:
    """What the run report says of a built model."""
    from tamis.runtime.api_client import ChatEndpoint
    from tamis.runtime.embeddings import EncoderModel

    if isinstance(model, ChatEndpoint):
        return {"label": label, "name": model.name, "fingerprint": model.fingerprint, "device": "remote", "dtype": "remote"}
    if isinstance(model, EncoderModel):
        return {"label": label, "name": model.name, "fingerprint": model.fingerprint, "device": model.device,
                "dtype": "float32"}
    from tamis.runtime.models import dtype_name

    return {"label": label, "name": model.name, "fingerprint": model.fingerprint, "device": str(model.device),
            "dtype": dtype_name(model.dtype)}


def _load(name: str, options: ExecOptions, **kw):
    from tamis.runtime.models import load_causal_lm

    if not options.progress:  # --no-progress silences transformers' own bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return load_causal_lm(name, device=options.device, dtype=options.dtype, cache_root=options.cache_dir, **kw)


def _built(env: BuildEnv, model: Any, training: dict | None = None) -> Built:
    info = describe_model(env.label, model)
    if hasattr(model, "dtype") and hasattr(model, "device"):  # a local LM: say why this dtype
        from tamis.runtime.models import dtype_reason

        info["dtype_reason"] = dtype_reason(model.device, env.options.dtype)
    return Built(model, info, training)


@kernel("model", "pfm", resources=_LLM)
def pfm(params: Mapping, env: BuildEnv) -> Built:
    if not env.options.pfm:
        raise ModelError("this recipe uses `pfm`: pass --pfm PATH_OR_NAME (a local folder, a .gguf file, "
                         "or a hub name already in the local cache)")
    return _built(env, _load(env.options.pfm, env.options))


@kernel("model", "hf", resources=_LLM)
def hf(params: Mapping, env: BuildEnv) -> Built:
    name = env.options.model_paths.get(params["name"], params["name"])
    return _built(env, _load(name, env.options, gguf_file=params.get("gguf")))


def _binding(params: Mapping, options: ExecOptions):
    from tamis.runtime.api_client import judge_binding

    return judge_binding(params["name"], params.get("base_url"), options.model_paths, options.api_base)


def _api_served(params: Mapping, options: ExecOptions) -> str | None:
    if _binding(params, options) is not None:
        return None
    name = params["name"]
    return (f"nothing serves it; bind a local chat model with --model {name}=PATH, or name an OpenAI-compatible "
            "endpoint with --api-base URL (or $OPENAI_BASE_URL; the key comes from $OPENAI_API_KEY)")


@kernel("model", "api", plan_check=_api_served, resources=Resources(device="cpu"))
def api(params: Mapping, env: BuildEnv) -> Built:
    binding = _binding(params, env.options)  # the plan check made sure something serves it
    if binding.local_path:
        return _built(env, _load(binding.local_path, env.options))
    from tamis.runtime.api_client import ChatEndpoint

    return _built(env, ChatEndpoint(binding.base_url, binding.name, max_wait=env.options.api_max_wait,
                                    max_consecutive_failures=env.options.api_max_failures))


@kernel("model", "proxy", resources=_LLM)
def proxy(params: Mapping, env: BuildEnv) -> Built:
    # proxy(of, model): the stand-in is the base that is not the PFM (the PFM itself is never loaded)
    stand_in = next(b for b in env.bases if b.ctor != "pfm" or len(env.bases) == 1)
    return _built(env, stand_in.get())


@kernel("model", "warmup", resources=_LLM)
def warmup(params: Mapping, env: BuildEnv) -> Built:
    from tamis.runtime.warmup import warm_up

    base = env.bases[0].get()
    if params.get("trained_on"):  # warmup(M, on=DATA): keyed by DATA's rows, as train(M, on=DATA)
        from tamis.runtime.warmup import train_on

        lm, info = train_on(base, env.inputs[0].get(), dict(params), env.artifacts, env.options, label=env.label)
        return _built(env, lm, info)
    lm, info = warm_up(base, env.pool, dict(params), env.artifacts, env.options, label=env.label,
                       draw_sample=env.inputs[0].get, pool_key=env.pool_fingerprint())
    return _built(env, lm, info)


def _train_runs(params: Mapping, options: ExecOptions) -> str | None:
    if params.get("task"):  # DEITA's in-recipe scorer training (tamis.ops.deita)
        from tamis.ops.deita import plan_problem

        return plan_problem(params)
    return None


@kernel("model", "train", plan_check=_train_runs, resources=_LLM)
def train(params: Mapping, env: BuildEnv) -> Built:
    """`train(M, on=D)`: M fine-tuned on dataset D — a loaded file, or a selection of the pool
    (`select s = … | …` then `train(pfm, on=s)`: iterative selection)."""
    from tamis.runtime.warmup import train_on

    if params.get("task"):  # DEITA's scorers: M taught to answer the complexity/quality prompt with a digit
        from tamis.ops.deita import train_scorer

        return train_scorer(params, env)
    if env.inputs and env.inputs[0].ctor == "subsets":  # probes: n models, each labelled by its evaluation loss
        from tamis.ops.probes import train_probes

        return train_probes(params, env)
    base = env.bases[0].get()
    lm, info = train_on(base, env.inputs[0].get(), dict(params), env.artifacts, env.options, label=env.label)
    return _built(env, lm, info)


@kernel("model", "encoder", resources=Resources(device="any"))
def encoder(params: Mapping, env: BuildEnv) -> Built:
    from tamis.runtime.embeddings import EncoderModel
    from tamis.runtime.models import resolve_device

    model = EncoderModel.bind(params["name"], dict(env.options.model_paths), str(resolve_device(env.options.device)))
    return _built(env, model)
