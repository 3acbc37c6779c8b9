"""What names mean: scorers, samplers, model and data constructors, functions.

The grammar knows none of these names. Checks read the declarations here (the
columns a scorer produces, the model it needs, its parameters and their types),
so adding a scorer is adding an entry, never a special case in the checker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Value types the checker understands.
#   count: a whole number of rows (> 0); seed: a whole number >= 0; size: a count or a percentage of the pool;
#   fraction: a percentage; number: any number; string; bool; model; data;
#   lora: a lora(...) configuration; column: a column name; list: a list of values.
ValueType = Literal["count", "seed", "size", "fraction", "number", "string", "bool", "model", "data", "lora", "column", "list", "any"]

# Column types.
#   group: a group label (a `cluster` id); any: a pool field whose type is not known until the pool is
#   read (checked then); other: a pool field no expression can use (a struct, a list of numbers...).
ColumnType = Literal["float", "bool", "text", "tags", "vector", "messages", "id", "group", "any", "other"]

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    name: str
    type: ValueType
    default: object = REQUIRED
    choices: tuple[str, ...] | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


# Which models a scorer/sampler accepts:
#   llm: a causal LLM (pfm, hf, api, trained); local_llm: an LLM whose weights we hold (not api);
#   embedder: an LLM or an encoder; encoder: a small non-LLM model; fit: a fitted predictor.
ModelNeed = Literal["llm", "local_llm", "lora_llm", "embedder", "encoder", "fit"]


@dataclass(frozen=True)
class ScorerSpec:
    name: str
    doc: str
    columns: dict[str, ColumnType]  # suffix -> type; "" is the main column (named by `as` or the scorer)
    model: ModelNeed | None = None
    params: tuple[Param, ...] = ()
    rowwise: bool = True  # a row's score depends on that row alone (so filters may move across it)
    cost: Literal["cheap", "model"] = "model"
    source: str = ""  # the reference implementation this follows
    needs_optimizer_state: bool = False  # reads a trained model's optimizer moments (LESS' Adam preconditioning)
    # parameters whose value "auto" depends on what the stage scores: name -> (value for the
    # pool's rows, value for `on TARGET`) — LESS preconditions training rows, not target rows
    auto: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    doc: str
    params: tuple[Param, ...] = ()
    model: ModelNeed | None = None
    needs_ranked: bool = False  # visits candidates in the current rank order
    column_types: dict[str, ColumnType] = field(default_factory=dict)  # params naming columns -> type
    source: str = ""


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    doc: str
    args: tuple[str, ...]  # argument kinds: "num", "any", "vector", "foreign", "tags", "const"
    returns: ColumnType
    aggregate: bool = False  # normalises over all rows (pct, zscore): not row-wise
    optional: int = 0  # how many of the last arguments may be left out


@dataclass(frozen=True)
class ModelCtor:
    name: str
    doc: str
    params: tuple[Param, ...]
    llm: bool | None  # None: same as its base model
    trained: bool = False
    api: bool = False


@dataclass(frozen=True)
class DataCtor:
    name: str
    doc: str
    params: tuple[Param, ...]
    llm_generated: bool = False


_TEMPLATE = Param("template", "string", "alpaca", ("alpaca", "bare", "chat", "none", "nuggets"),
                  "prompt template of the reference code")
_MAXLEN = Param("max_length", "count", 512, doc="truncation length in tokens")
_TURNS = Param("turns", "string", "first", ("first", "last", "mean", "sum"), "how a multi-turn conversation's per-turn values combine")
_BUDGET = Param("budget", "size", doc="how many rows to keep (a count or a percentage of the pool)")

SCORERS: dict[str, ScorerSpec] = {
    s.name: s
    for s in [
        ScorerSpec("length", "length of a text field (characters, words or tokens)", {"": "float"}, None,
                   (Param("field", "string", "output", ("instruction", "input", "output", "all")),
                    Param("unit", "string", "words", ("chars", "words"))), cost="cheap"),
        ScorerSpec("mtld", "measure of textual lexical diversity of the output (Instruction-Mining indicator)", {"": "float"}, None,
                   (Param("field", "string", "output", ("instruction", "input", "output", "all")),
                    Param("threshold", "number", 0.72)), cost="cheap"),
        ScorerSpec("loss", "mean cross-entropy of the answer tokens given the prompt", {"": "float"}, "local_llm",
                   (_TEMPLATE, _MAXLEN, _TURNS)),
        ScorerSpec("ppl", "perplexity: exp of the mean answer cross-entropy given the prompt", {"": "float"}, "local_llm",
                   (_TEMPLATE, _MAXLEN, _TURNS)),
        ScorerSpec("ifd", "instruction-following difficulty: answer loss with the prompt over answer loss alone",
                   {"": "float", "_cond": "float", "_direct": "float"}, "local_llm",
                   (Param("form", "string", "loss_ratio", ("loss_ratio", "ppl_ratio"),
                          "Cherry LLM: ratio of mean losses; Superfiltering: ratio of perplexities"),
                    _TEMPLATE, _MAXLEN, _TURNS),
                   source="tianyi-lab/Cherry_LLM cherry_seletion/data_analysis.py; tianyi-lab/Superfiltering code_ifd/data_analysis.py"),
        ScorerSpec("rating", "AlpaGasus accuracy rating 0-5 from a judge model (first line parsed as a number)", {"": "float"}, "llm",
                   (Param("prompt", "string", "alpagasus", ("alpagasus",)), Param("max_tokens", "count", 256)),
                   source="gpt4life/alpagasus rating/chatgpt_rating.py"),
        ScorerSpec("tags", "InsTag open-set intention tags from a tagger model (a JSON list of tags with explanations)",
                   {"": "tags"}, "llm",
                   (Param("prompt", "string", "instag", ("instag",)),
                    Param("max_tokens", "count", 512, doc="the most tokens a tagger's reply may have")),
                   source="OFA-Sys/InsTag (InsTagger's prompt, Vicuna v1.1 format)"),
        ScorerSpec("complexity", "DEITA complexity score: sum_k k*softmax(logits of '1'..'6')", {"": "float"}, "local_llm",
                   (Param("max_length", "count", 2048),), source="hkust-nlp/deita scorer"),
        ScorerSpec("quality", "DEITA quality score: sum_k k*softmax(logits of '1'..'6')", {"": "float"}, "local_llm",
                   (Param("max_length", "count", 2048),), source="hkust-nlp/deita scorer"),
        ScorerSpec("grads", "LESS per-sample LoRA gradient features, Adam-preconditioned for training data, randomly projected",
                   {"": "vector"}, "lora_llm",
                   (Param("dim", "count", 8192, doc="random projection width"),
                    Param("seed", "seed", 0, doc="the Rademacher projection's seed"),
                    Param("precondition", "string", "auto", ("auto", "adam", "none"),
                          "adam: Adam-preconditioned (training rows); none: plain gradients (target rows); "
                          "auto: adam for the pool's rows, none for `on TARGET`"),
                    Param("checkpoints", "string", "all", ("all", "last"),
                          "the warmup checkpoints summed: every epoch's (LESS) or the last only"),
                    Param("weights", "string", "lr", ("lr", "uniform"),
                          "each checkpoint's weight in the sum: its epoch's mean learning rate (LESS), "
                          "renormalised to 1, or equal weights"),
                    Param("max_length", "count", 512, doc="truncation length in tokens")),
                   source="princeton-nlp/LESS less/data_selection", needs_optimizer_state=True,
                   auto={"precondition": ("adam", "none")}),
        ScorerSpec("icl_loss", "Nuggets one-shot losses: each anchor's answer loss with this row as a one-shot prefix",
                   {"": "vector"}, "local_llm",
                   (Param("anchors", "data"), Param("max_length", "count", 200)), source="pldlgb/nuggets"),
        ScorerSpec("embedding", "a text embedding (mean of the last hidden state, or the last real token for LLMs)",
                   {"": "vector"}, "embedder",
                   (Param("pooling", "string", "mean", ("mean", "last")), Param("field", "string", "all", ("instruction", "all")))),
        ScorerSpec("reward", "score of a sequence-classification reward model on (instruction [+ input], response): "
                   "its single logit, or logit[1] - logit[0] for a two-way head", {"": "float"}, "encoder", (),
                   source="OpenAssistant reward models as Instruction-Mining uses them"),
        ScorerSpec("unieval", "UniEval dialogue score on one dimension: P(Yes)/(P(Yes)+P(No)) of the T5 evaluator "
                   "over its boolean question (history: instruction [+ input]; response: output)", {"": "float"}, "encoder",
                   (Param("dimension", "string", REQUIRED, ("naturalness", "coherence", "understandability")),)),
        ScorerSpec("predict", "the prediction of a fitted selector from its feature columns", {"": "float"}, "fit", (), cost="cheap"),
        ScorerSpec("cluster", "KMeans cluster id of each row over a model's embeddings: a group column for `per`",
                   {"": "group"}, "embedder", (Param("k", "count", 10, doc="number of clusters"),
                                               Param("seed", "seed", 0, doc="KMeans' random state")),
                   rowwise=False, source="KMeans as Cherry LLM's and InstructionGPT-4's clustering steps"),
        ScorerSpec("knn", "mean Euclidean distance to the k nearest other rows over L2-normalised embeddings "
                   "(Instruction-Mining KNN-6); null for a lone row",
                   {"": "float"}, "embedder", (Param("k", "count", 6),), rowwise=False,
                   source="Instruction-Mining (arXiv 2307.06290) KNN-6 indicator"),
    ]
}

SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in [
        SamplerSpec("repr_filter", "DEITA: visit in rank order, drop a row whose cosine similarity to any kept row exceeds threshold",
                    (_BUDGET, Param("threshold", "number", 0.9)), "embedder", needs_ranked=True, source="hkust-nlp/deita filter"),
        SamplerSpec("complexity_first", "InsTag: most tags first, add a row when it brings a new tag; reset coverage after a full pass",
                    (_BUDGET, Param("tags", "column", "tags")), None, column_types={"tags": "tags"}, source="InsTag paper"),
        SamplerSpec("facility_location", "lazy-greedy facility location over embeddings (Superfiltering-D)",
                    (_BUDGET, Param("metric", "string", "euclidean", ("euclidean", "cosine"))), "embedder",
                    source="tianyi-lab/Superfiltering code_diversity_fla/do_fla.py"),
        SamplerSpec("kcenter", "greedy k-center over embeddings", (_BUDGET,), "embedder"),
    ]
}

@dataclass(frozen=True)
class DedupSpec:
    name: str
    doc: str
    params: tuple[Param, ...] = ()
    model: ModelNeed | None = None
    source: str = ""


_DEDUP_FIELD = Param("field", "string", "all", ("instruction", "input", "output", "all"),
                     "the text compared: one field, or instruction, input and output together")
DEDUP_METHODS: dict[str, DedupSpec] = {
    d.name: d
    for d in [
        DedupSpec("exact", "equal text once normalised (lower case, whitespace collapsed, punctuation dropped)",
                  (_DEDUP_FIELD,)),
        DedupSpec("minhash", "near-duplicate text: estimated Jaccard similarity of word n-grams ≥ threshold "
                  "(MinHash LSH, datasketch)",
                  (Param("threshold", "number", 0.8), Param("ngram", "count", 5, doc="words per shingle"),
                   Param("num_perm", "count", 128, doc="MinHash permutations"), Param("seed", "seed", 1), _DEDUP_FIELD),
                  source="ekzhu/datasketch MinHashLSH"),
        DedupSpec("semantic", "near-duplicate meaning: cosine similarity of embeddings ≥ threshold (chunked, never N×N)",
                  (Param("threshold", "number", 0.95),), "embedder"),
    ]
}

FUNCTIONS: dict[str, FunctionSpec] = {
    f.name: f
    for f in [
        FunctionSpec("pct", "percentile rank in [0, 1] over the current rows (for blending scores)", ("num",), "float", aggregate=True),
        FunctionSpec("zscore", "standard score over the current rows", ("num",), "float", aggregate=True),
        FunctionSpec("minmax", "min-max scaling to [0, 1] over the current rows", ("num",), "float", aggregate=True),
        FunctionSpec("log", "natural logarithm", ("num",), "float"),
        FunctionSpec("exp", "exponential", ("num",), "float"),
        FunctionSpec("abs", "absolute value", ("num",), "float"),
        FunctionSpec("min", "the smaller of two values", ("num", "num"), "float"),
        FunctionSpec("max", "the larger of two values", ("num", "num"), "float"),
        FunctionSpec("coalesce", "the first value unless it is null", ("num", "num"), "float"),
        FunctionSpec("is_null", "whether a score is null (skipped)", ("any",), "bool"),
        FunctionSpec("count", "the number of tags", ("tags",), "float"),
        FunctionSpec("win_rate", "Nuggets golden score: fraction of anchors whose loss the one-shot prompt lowers",
                     ("vector", "foreign"), "float"),
        FunctionSpec("influence", "LESS: checkpoint-weighted cosine of train and target gradients, mean over the "
                     "target's rows; with a third argument, a field of the target set naming each row's subtask "
                     "(influence(g, t, t.subtask)), the mean over each subtask's rows, then the max",
                     ("vector", "foreign", "foreign"), "float", optional=1),
    ]
}

_LORA = Param("lora", "lora", None, doc="a lora(...) configuration; full fine-tuning when absent")
_TRAIN_OPTS = (
    Param("epochs", "number", 1),
    Param("lr", "number", 2e-5),
    Param("batch", "count", 32),
    Param("max_length", "count", 512),
    Param("seed", "seed", 42),
)

MODEL_CTORS: dict[str, ModelCtor] = {
    m.name: m
    for m in [
        ModelCtor("hf", "an open model by local path or hub name", (Param("name", "string"), Param("params", "number", None),
                                                                    Param("gguf", "string", None)), llm=True),
        ModelCtor("encoder", "a small non-LLM model (sentence encoder, reward or evaluator model)", (Param("name", "string"),), llm=False),
        ModelCtor("api", "a proprietary model behind an OpenAI-compatible endpoint",
                  (Param("name", "string"), Param("base_url", "string", None)), llm=True, api=True),
        ModelCtor("proxy", "a smaller model standing in for the PFM (tied to it: not model-free)",
                  (Param("of", "model"), Param("model", "model")), llm=None),
        ModelCtor("warmup", "a model trained on a sample of the pool, or on a dataset (`on=`: a selection, a file)",
                  (Param("model", "model"), Param("size", "size", None), _LORA,
                   Param("select", "string", "random", ("random", "cherry")), Param("clusters", "count", 100))
                  + _TRAIN_OPTS
                  + (Param("optimizer_state", "bool", False,
                           doc="keep the optimizer's moments with each checkpoint (set for you when a stage needs them)"),
                     Param("on", "data", None, doc="train on this dataset (a `select`ion, a loaded file) instead of a sample of the pool")),
                  llm=None, trained=True),
        ModelCtor("train", "a model trained on a dataset (n copies when the dataset is n subsets)",
                  (Param("model", "model"), Param("on", "data"), _LORA, Param("task", "string", None)) + _TRAIN_OPTS
                  + (Param("evaluate_on", "data", None,
                           doc="probes (on=subsets(…)): the evaluation set whose answer loss labels each probe; "
                               "default: the subsets' held-out rows (subsets(…, holdout=P))"),),
                  llm=None, trained=True),
        ModelCtor("fit", "a small predictor fitted on a dataset's feature columns against the losses of probe models",
                  (Param("kind", "string", REQUIRED, ("linear", "selfattn")), Param("on", "data"), Param("labels", "model"),
                   Param("features", "list"),
                   Param("log_loss", "bool", True, doc="fit log(loss), as Instruction-Mining's rule (linear)"),
                   Param("layers", "count", 2, doc="selfattn: attention layers (InstructionGPT-4's train.sh: 2)"),
                   Param("heads", "count", 1, doc="selfattn: attention heads (must divide the number of features)"),
                   Param("epochs", "count", 20, doc="selfattn: training epochs (full batch, Adam)"),
                   Param("lr", "number", 0.01, doc="selfattn: Adam learning rate"),
                   Param("seed", "seed", 42)), llm=False, trained=True),
        ModelCtor("lora", "a LoRA configuration for warmup/train",
                  (Param("r", "count", 8), Param("alpha", "number", 16), Param("dropout", "number", 0.05),
                   Param("targets", "list", None)), llm=False),
    ]
}

DATA_CTORS: dict[str, DataCtor] = {
    d.name: d
    for d in [
        DataCtor("load", "a dataset file (JSON, JSONL, Parquet, ShareGPT)", (Param("path", "string"), Param("format", "string", "auto"))),
        DataCtor("sample", "a random sample of a dataset", (Param("data", "data"), Param("size", "size"), Param("seed", "seed", 42))),
        DataCtor("subsets", "n random subsets of a dataset (each trains one model)",
                 (Param("data", "data"), Param("n", "count"), Param("size", "size", None), Param("seed", "seed", 42),
                  Param("holdout", "size", None,
                        doc="rows set aside before drawing (the probes' evaluation set), never in a subset"))),
        DataCtor("anchors", "k representative rows: KMeans on embeddings, the nearest row to each centroid (Nuggets)",
                 (Param("data", "data"), Param("k", "count", 100), Param("model", "model", None), Param("seed", "seed", 0))),
        DataCtor("evolve", "an LLM-evolved variant set of a dataset (DEITA's Evol-Instruct data)",
                 (Param("data", "data"), Param("model", "model"),
                  Param("rounds", "count", 4, doc="in-depth evolutions per seed (at most 4: five variants, scored 1-6)"),
                  Param("max_tokens", "count", 512, doc="longest reply generated (an evolution, a ranking)"),
                  Param("ranking", "string", "free", ("free", "constrained"),
                        doc="the judge's rank replies: free greedy text, parsed (DEITA's), or held to "
                            "\"[k] Score: s\" with s the local judge's greedy choice among the scores")),
                 llm_generated=True),
    ]
}

# `normalize COLUMN with …` (InsTag's tag normalisation) takes these options.
TAG_NORMALIZE_PARAMS: tuple[Param, ...] = (
    Param("min_freq", "count", 1, doc="drop tags seen fewer times than this"),
    Param("lower", "bool", True, doc="rule aggregation: lower-case"),
    Param("stem", "bool", True, doc="rule aggregation: stem words (Snowball English); punctuation is always stripped"),
    Param("semantic", "model", None, doc="semantic aggregation: cluster tag embeddings of this encoder"),
    Param("threshold", "number", 0.9, doc="cosine similarity above which tags merge"),
    Param("association", "number", None, doc="association aggregation: merge tags that co-occur in at least this "
                                             "share of the rows of the rarer one (off by default)"),
)

# Names bound at run time.
RUNTIME_MODELS = {"pfm": "the pending fine-tune model (--pfm)"}
RUNTIME_DATA = {"pool": "the candidate pool (--pool)"}
POOL_COLUMNS: dict[str, ColumnType] = {
    "id": "id", "instruction": "text", "input": "text", "output": "text", "messages": "messages",
}

# Parameter counts of well-known models whose names do not say their size.
KNOWN_PARAMS = {"gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1.5e9,
                "all-minilm-l6-v2": 22.7e6, "gpt-3.5-turbo": None, "gpt-4": None}


def all_names() -> dict[str, list[str]]:
    """Every name by kind, for did-you-mean across kinds."""
    return {
        "scorer": list(SCORERS), "sampler": list(SAMPLERS), "function": list(FUNCTIONS),
        "model constructor": [m for m in MODEL_CTORS if m != "lora"], "data constructor": list(DATA_CTORS),
        "dedup method": list(DEDUP_METHODS),
    }
