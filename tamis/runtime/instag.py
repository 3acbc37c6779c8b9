"""InsTag (Lu et al. 2023, arXiv 2308.07074) as pure functions: read a tagger's answer, normalise the tags,
and complexity-first diverse sampling.

OFA-Sys/InsTag publishes no code, so everything here follows the paper's prose; where the paper gives no
number (its thresholds: `min_freq`, the semantic similarity threshold, the association thresholds) the
defaults are ours — thresholds not confirmed.

* `parse_tags(text)` — the tagger's answer (a JSON list of {"tag", "explanation"} objects) → its tags, or
  the reason there are none. Tolerates code fences, prose around the list, single quotes, trailing commas,
  Python literals (True/None) and a bare list of strings; never raises.
* `normalise_tags(rows, …)` — the paper's four normalisation steps, in this order:
  1. frequency filtering — raw tags in fewer than `min_freq` rows are dropped (before anything merges);
  2. rule aggregation — lower-case (`lower`), every character that is not a letter or digit becomes a space,
     whitespace collapses, each word is stemmed (`stem`; Snowball English, i.e. Porter2). Tags with equal
     rule forms merge. As in the paper, punctuation is not kept: "C++", "C#" and "C" merge;
  3. semantic aggregation (only with `embed`) — the tags left are embedded and clustered as the paper does
     (DBSCAN; it embeds with PhraseBERT, any sentence encoder here): DBSCAN(eps=1−threshold, min_samples=1,
     metric="cosine"), whose clusters are the connected components of the graph joining tags with cosine
     similarity ≥ `threshold` (so merges chain: a~b, b~c merge a and c); computed blockwise in float32;
  4. association aggregation (only with `assoc_threshold`) — tags a, b both in ≥ `min_count_assoc` rows
     merge when count(a∧b) / min(count(a), count(b)) ≥ `assoc_threshold`, i.e. when either association rule
     a→b or b→a has that confidence (pairs only, not longer itemsets; evaluated once on the rows of step 3,
     merges chain as in step 3). The paper mines rules with FP-Growth and merges "recursively" without
     publishing its support or confidence.
  Counts are rows containing a tag (a tag twice in a row counts once). Each merged group is named by its
  most frequent member (at step 2: the most frequent original spelling), ties by first appearance.
* `complexity_first(tags, budget)` — the paper's complexity-first diverse sampling.
"""

from __future__ import annotations

import ast
import heapq
import json
import re
from array import array
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["NormalisedTags", "complexity_first", "normalise_tags", "parse_tags", "rule_form"]

# --------------------------------------------------------------------------- parse_tags

_MAX_STARTS = 64  # `[` positions tried as the start of the answer's list
_MAX_LITERAL = 200_000  # longest candidate handed to Python's parser (single-quoted lists)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
# failure reasons, least to most informative: the reason returned is the most informative one met
_REASONS = ("no JSON list found", "invalid JSON list", "truncated JSON list", "items have no tag")


def parse_tags(text: str) -> tuple[list[str] | None, str | None]:
    """The tags in a tagger's answer: `(tags, None)`, or `(None, reason)` when it holds none.

    The answer should hold a JSON list of {"tag": …, "explanation": …} objects; a list of strings is read as
    the tags themselves. Every `[` outside a string is tried as the list's start (the first few dozen), in
    order, until one parses — as JSON, then JSON without trailing commas, then as a Python literal (single
    quotes). A list that parses but has no tag goes on to the next `[`. With no list of tags, the answer's
    top-level objects are read instead, each {"tag": …} one tag: the request itself shows the format as one
    object ({"tag": str, "explanation": str}), and taggers answer with one, or several, unlisted. Tags are
    stripped, empty ones and repeats dropped, order kept; an empty list gives `([], None)`. Reasons: "empty
    answer", "no JSON list found", "invalid JSON list", "truncated JSON list" (a `[` never closed: the
    answer was cut off), "items have no tag".
    """
    try:
        return _parse_tags(text)
    except Exception:  # noqa: BLE001 — a tagger's answer is arbitrary text: never raise on it
        return None, "invalid JSON list"


def _parse_tags(text: str) -> tuple[list[str] | None, str | None]:
    if not isinstance(text, str) or not text.strip():
        return None, "empty answer"
    reason = 0
    empty = False
    # `[` inside a string of an earlier candidate (a bracket in an explanation) are tried last, and only for
    # tags: their failures say nothing about the answer
    inside: list[int] = []
    ends: dict[int, int | None] = {}  # `[` → its closing `]` (None: never closed, -1: closed by `}`)
    tried = 0
    start = text.find("[")
    while start != -1 and tried < _MAX_STARTS:
        if start not in inside:
            tried += 1
            if start not in ends:
                _closing(text, start, ends, inside)
            end = ends[start]
            if end is None:
                reason = max(reason, 2)
            elif end < 0:
                reason = max(reason, 1)
            else:
                value = _load(text[start:end + 1])
                if not isinstance(value, list):
                    reason = max(reason, 1)
                elif not value:
                    empty = True
                else:
                    tags = _tags_of(value)
                    if tags:
                        return tags, None
                    reason = max(reason, 3)
        start = text.find("[", start + 1)
    ends = {}
    for start in sorted(set(inside))[:_MAX_STARTS]:
        if start not in ends:
            _closing(text, start, ends, [])
        end = ends[start]
        value = _load(text[start:end + 1]) if end is not None and end >= 0 else None
        tags = _tags_of(value) if isinstance(value, list) else None
        if tags:
            return tags, None
    objects = [v for v in map(_load, _top_level_objects(text)) if isinstance(v, dict)]
    tags = _tags_of(objects)
    if tags:
        return tags, None
    if empty:
        return [], None
    if objects and reason == 0:
        reason = 3  # objects, none with a tag
    return None, _REASONS[reason]


def _top_level_objects(text: str) -> list[str]:
    """The `{…}` spans of the text not nested in another bracket (strings skipped), the first few dozen."""
    out: list[str] = []
    depth, start, quote, escaped_at = 0, -1, "", -1
    for m in _SPECIAL.finditer(text):
        i, c = m.start(), m.group()
        if i == escaped_at:
            continue
        if quote:
            if c == "\\":
                escaped_at = i + 1
            elif c == quote:
                quote = ""
        elif c == '"' or (c == "'" and depth):  # an apostrophe in prose opens no string
            quote = c
        elif c in "[{":
            if depth == 0 and c == "{":
                start = i
            depth += 1
        elif c in "]}" and depth:
            depth -= 1
            if depth == 0 and c == "}" and start >= 0:
                out.append(text[start:i + 1])
                start = -1
                if len(out) >= _MAX_STARTS:
                    break
            elif depth == 0:
                start = -1
    return out


_SPECIAL = re.compile(r"[\[\]{}\"'\\]")  # the characters `_closing` looks at


def _closing(text: str, start: int, ends: dict[int, int | None], inside: list[int]) -> None:
    """Scan from the `[` at `start` to its closing bracket, noting in `ends` where each `[` met on the way
    (outside strings) is closed: at a `]`, -1 when a `}` closes it, None when it never is (the answer was
    cut off). Brackets inside '…' or "…" strings are ignored, and their `[` added to `inside`. One scan
    answers for every `[` nested in the first, so many brackets cost one pass, not one each."""
    stack: list[int] = []
    quote = ""
    escaped_at = -1  # a backslash in a string escapes the next character
    for m in _SPECIAL.finditer(text, start):
        i = m.start()
        if i == escaped_at:
            continue
        c = text[i]
        if quote:
            if c == "\\":
                escaped_at = i + 1
            elif c == quote:
                quote = ""
            elif c == "[" and len(inside) < _MAX_STARTS:
                inside.append(i)
        elif c in "\"'":
            quote = c
        elif c in "[{":
            stack.append(i)
        elif c in "]}":
            opener = stack.pop()
            if text[opener] == "[":
                ends[opener] = i if c == "]" else -1
            if not stack:
                return
    for opener in stack:
        if text[opener] == "[":
            ends[opener] = None


def _load(s: str) -> Any:
    for candidate in (s, _TRAILING_COMMA.sub(r"\1", s)):
        try:
            return json.loads(candidate, strict=False)
        except (ValueError, RecursionError):
            pass
    if len(s) <= _MAX_LITERAL:
        try:
            return _literal(ast.parse(s.strip(), mode="eval").body)
        except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
            pass
    return None


def _literal(node: ast.AST) -> Any:
    """ast.literal_eval that also knows JSON's true/false/null."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k) if k is not None else None: _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _literal(node.operand)
    raise ValueError("not a literal")


def _tags_of(items: list) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        tag = item
        if isinstance(item, dict):
            tag = next((v for k, v in item.items() if isinstance(k, str) and k.strip().lower() == "tag"), None)
        if not isinstance(tag, str):
            continue
        tag = tag.strip()
        if tag and tag not in seen:
            seen.add(tag)
            out.append(tag)
    return out


# --------------------------------------------------------------------------- normalise_tags

_NON_WORD = re.compile(r"[\W_]+")  # anything but a letter or digit (Unicode-aware)
_SIM_ELEMENTS = 1 << 24  # semantic step: most similarities held at once (64 MiB of float32)


@dataclass
class NormalisedTags:
    """`normalise_tags`'s result.

    rows — each row's normalised tags (deduplicated, first-appearance order; None stays None);
    mapping — raw tag → normalised tag, for every raw tag kept;
    dropped — raw tags dropped by the frequency filter → their row counts;
    counts — distinct tags after each step: raw, after_frequency, after_rules, after_semantic,
             after_association (a step that does not run leaves the count unchanged);
    frequency — normalised tag → rows containing it, most frequent first;
    unusable — raw tags kept by frequency whose rule form is empty (only punctuation) → their row counts;
               they are dropped too, and are not in `mapping`.
    """

    rows: list[list[str] | None]
    mapping: dict[str, str]
    dropped: dict[str, int]
    counts: dict[str, int]
    frequency: dict[str, int] = field(default_factory=dict)
    unusable: dict[str, int] = field(default_factory=dict)


def rule_form(tag: str, *, lower: bool = True, stem: bool = True, _cache: dict | None = None) -> str:
    """Rule aggregation's key: lower-cased (`lower`), non-alphanumerics → spaces, whitespace collapsed,
    each word Snowball-stemmed (`stem`). Tags with equal keys merge. "" when nothing is left."""
    s = tag.lower() if lower else tag
    words = _NON_WORD.sub(" ", s).split()
    if stem and words:
        stemmer = _stemmer()
        if _cache is None:
            words = stemmer.stemWords(words)
        else:
            out = []
            for w in words:
                st = _cache.get(w)
                if st is None:
                    st = _cache[w] = stemmer.stemWord(w)
                out.append(st)
            words = out
    return " ".join(words)


_STEMMER: Any = None


def _stemmer() -> Any:
    global _STEMMER
    if _STEMMER is None:
        import snowballstemmer

        _STEMMER = snowballstemmer.stemmer("english")
    return _STEMMER


def normalise_tags(rows: Sequence[Sequence[str] | None], *, min_freq: int = 1, lower: bool = True,
                   stem: bool = True, embed: Callable[[list[str]], np.ndarray] | None = None,
                   threshold: float = 0.9, assoc_threshold: float | None = None,
                   min_count_assoc: int = 5) -> NormalisedTags:
    """InsTag's tag normalisation (see the module's docstring for the four steps and their order).

    `embed(texts) -> (len(texts), dim)` array: semantic aggregation embeds each tag left after the rules
    (by its name, the most frequent original spelling) — e.g. `EncoderModel.encode`. Vectors are
    L2-normalised here, so the embedder need not. The clustering never holds the N×N similarity matrix:
    blocks of ≤ 64 MiB of it, and the partition (O(N)); its time is O(N²·dim) (20k tags: seconds).
    """
    if min_freq < 1:
        min_freq = 1
    # -- raw tags as integer ids, per row, deduplicated (order kept)
    is_none = np.fromiter((row is None for row in rows), dtype=bool, count=len(rows))
    row_of, tag_ids, names = _encode(rows, clean=True)
    n_raw = len(names)
    counts = {"raw": n_raw}
    raw_count = np.bincount(tag_ids, minlength=n_raw)

    # -- 1. frequency filtering (raw tags); 2. rule aggregation of the survivors
    keep = raw_count >= min_freq
    dropped = {names[i]: int(raw_count[i]) for i in np.flatnonzero(~keep)}
    counts["after_frequency"] = int(keep.sum())
    group = np.full(n_raw, -1, dtype=np.int64)  # raw id → rule group id (-1: dropped)
    key_ids: dict[str, int] = {}
    unusable: dict[str, int] = {}
    stems: dict[str, str] = {}
    for i in np.flatnonzero(keep):
        key = rule_form(names[i], lower=lower, stem=stem, _cache=stems)
        if not key:
            unusable[names[i]] = int(raw_count[i])
            continue
        group[i] = key_ids.setdefault(key, len(key_ids))
    n_groups = len(key_ids)
    counts["after_rules"] = n_groups
    # the group's name: its most frequent raw spelling, ties by first appearance (= lowest raw id)
    members = np.flatnonzero(group >= 0)
    order = np.lexsort((members, -raw_count[members], group[members]))
    first = np.ones(len(order), dtype=bool)
    first[1:] = group[members[order]][1:] != group[members[order]][:-1]
    group_name = [""] * n_groups
    for m in members[order][first]:
        group_name[group[m]] = names[m]

    # rows in rule groups (dropped tags removed, repeats merged)
    tag_ids = group[tag_ids]
    row_of, tag_ids = _dedupe(row_of, tag_ids, n_groups)
    labels = np.arange(n_groups, dtype=np.int64)  # rule group → final tag id (a rule group id)

    # -- 3. semantic aggregation
    if embed is not None and n_groups > 1:
        freq = np.bincount(tag_ids, minlength=n_groups)
        sem = _semantic_clusters([group_name[g] for g in range(n_groups)], embed, threshold)
        merge = _name_groups(sem, freq)
        labels = merge[labels]
        row_of, tag_ids = _dedupe(row_of, merge[tag_ids], n_groups)
    counts["after_semantic"] = len(np.unique(labels))

    # -- 4. association aggregation
    if assoc_threshold is not None and len(tag_ids):
        freq = np.bincount(tag_ids, minlength=n_groups)
        assoc = _association_components(row_of, tag_ids, freq, n_groups, assoc_threshold, min_count_assoc)
        merge = _name_groups(assoc, freq)
        labels = merge[labels]
        row_of, tag_ids = _dedupe(row_of, merge[tag_ids], n_groups)
    counts["after_association"] = len(np.unique(labels))

    # -- the result
    final_name = [group_name[t] for t in labels.tolist()]
    mapping = {names[i]: final_name[g] for i, g in enumerate(group.tolist()) if g >= 0}
    bounds = np.searchsorted(row_of, np.arange(len(rows) + 1)).tolist()
    flat_names = [group_name[t] for t in tag_ids.tolist()]
    out_rows: list[list[str] | None] = [None if none else flat_names[a:b]
                                        for none, a, b in zip(is_none.tolist(), bounds[:-1], bounds[1:])]
    freq = np.bincount(tag_ids, minlength=n_groups)
    final = np.flatnonzero(freq)
    frequency = {group_name[t]: int(freq[t]) for t in final[np.argsort(-freq[final], kind="stable")]}
    return NormalisedTags(out_rows, mapping, dropped, counts, frequency, unusable)


def _encode(rows: Sequence[Sequence[Any] | None], clean: bool) -> tuple[np.ndarray, np.ndarray, list]:
    """Rows of tags as (row of each element, tag id of each element, tag of each id): ids in order of first
    appearance, repeats within a row dropped (first kept), rows in order. `clean`: tags are stripped, and
    empty or non-string ones dropped. C-level dict and numpy work: a few seconds per 5M tags."""
    lengths = np.fromiter((0 if row is None else len(row) for row in rows), dtype=np.int64, count=len(rows))
    flat = list(chain.from_iterable(row for row in rows if row is not None))
    if clean:
        flat = [t.strip() if isinstance(t, str) else "" for t in flat]
    names = list(dict.fromkeys(flat))
    index = dict(zip(names, range(len(names))))
    tag_ids = np.fromiter(map(index.__getitem__, flat), dtype=np.int64, count=len(flat))
    row_of = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    if clean and "" in index:  # drop empty tags, closing the gap in the ids
        gap = index[""]
        names.pop(gap)
        tag_ids = np.where(tag_ids == gap, -1, tag_ids - (tag_ids > gap))
    row_of, tag_ids = _dedupe(row_of, tag_ids, len(names))
    return row_of, tag_ids, names


def _dedupe(row_of: np.ndarray, tag_ids: np.ndarray, n_tags: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop tag id < 0 and every repeat of (row, tag) after its first; order kept."""
    ok = tag_ids >= 0
    row_of, tag_ids = row_of[ok], tag_ids[ok]
    if not len(tag_ids):
        return row_of, tag_ids
    _, first = np.unique(row_of * max(n_tags, 1) + tag_ids, return_index=True)
    first.sort()
    return row_of[first], tag_ids[first]


def _name_groups(component: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """tag id → the id naming its component: the most frequent member, ties by lowest id (first seen)."""
    n = len(component)
    idx = np.arange(n)
    order = np.lexsort((idx, -freq, component))
    lead = np.ones(n, dtype=bool)
    lead[1:] = component[order][1:] != component[order][:-1]
    leader_of = np.empty(component.max() + 1 if n else 0, dtype=np.int64)
    leader_of[component[order][lead]] = order[lead]
    return leader_of[component]


def _semantic_clusters(texts: list[str], embed: Callable[[list[str]], np.ndarray],
                       threshold: float) -> np.ndarray:
    """Component label of each text in the graph joining texts whose embeddings' cosine is ≥ `threshold`:
    the clusters of DBSCAN(eps=1−threshold, min_samples=1, metric="cosine") (every point is a core point,
    so its clusters are exactly these components), computed in float32 blocks of rows against the rows
    after them (≤ 64 MiB of similarities at a time) and folded block by block with scipy's
    connected_components, so memory stays O(n·dim + block) whatever the cluster sizes."""
    emb = np.asarray(embed(list(texts)), dtype=np.float32)
    n = len(texts)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"embed returned shape {emb.shape} for {n} tags; expected ({n}, dim)")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.where(norms > 0, norms, 1.0)
    root = np.arange(n, dtype=np.int64)
    block = max(1, min(1024, _SIM_ELEMENTS // max(n, 1)))
    for lo in range(0, n, block):
        sims = emb[lo:lo + block] @ emb[lo:].T  # rows lo… against rows lo…: each pair once
        i, j = np.nonzero(sims >= np.float32(threshold))
        above = j > i
        if above.any():
            root = _fold(root, i[above] + lo, j[above] + lo)
    return root


def _fold(root: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Join the partition `root` (each element's lowest member) with the pairs (a, b)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(root)
    a, b = root[a], root[b]
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n)).tocsr()
    _, label = connected_components(graph, directed=False)
    label = label[root]
    _, first, inverse = np.unique(label, return_index=True, return_inverse=True)
    return first[inverse].astype(np.int64)


def _association_components(row_of: np.ndarray, tag_ids: np.ndarray, freq: np.ndarray, n_tags: int,
                            assoc_threshold: float, min_count: int) -> np.ndarray:
    """Components of the graph joining tags a, b (both in ≥ min_count rows) with
    count(a∧b) / min(count(a), count(b)) ≥ assoc_threshold. Pairs are counted row length by row length,
    vectorised: Σ k(k−1)/2 pair codes over the rows' eligible tags (k tags in a row)."""
    parent = np.arange(n_tags, dtype=np.int64)
    ok = freq[tag_ids] >= max(min_count, 1)
    r, t = row_of[ok], tag_ids[ok]
    if len(t) < 2:
        return parent
    order = np.lexsort((t, r))
    r, t = r[order], t[order]  # within a row: tags ascending, so pairs come out as (small, large)
    starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
    lens = np.diff(np.r_[starts, len(r)])
    codes = []
    for k in np.unique(lens):
        if k < 2:
            continue
        block = t[starts[lens == k][:, None] + np.arange(k)]  # (rows with k tags, k)
        i, j = np.triu_indices(k, 1)
        codes.append((block[:, i] * n_tags + block[:, j]).ravel())
    if not codes:
        return parent
    pairs, co = np.unique(np.concatenate(codes), return_counts=True)
    a, b = pairs // n_tags, pairs % n_tags
    hit = co / np.minimum(freq[a], freq[b]) >= assoc_threshold
    for x, y in zip(a[hit].tolist(), b[hit].tolist()):
        rx, ry = _find(parent, x), _find(parent, y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return np.array([_find(parent, x) for x in range(n_tags)], dtype=np.int64)


def _find(parent: np.ndarray, x: int) -> int:
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:
        parent[x], x = root, parent[x]
    return int(root)


# --------------------------------------------------------------------------- complexity_first

_PLAIN_PASSES = 3  # most plain scans before the indexed passes


def complexity_first(tags: Sequence[Sequence[str] | None], budget: int, *, fill: bool = True) -> list[int]:
    """InsTag's complexity-first diverse sampling; positions into `tags`, in pick order.

    Rows are sorted by their number of distinct tags, descending (stable: ties keep input order). A pass
    scans the rows not yet picked in that order with an empty covered set, picking a row when it brings a
    tag not yet covered (and covering its tags); after a full pass the covered set is reset and the next
    pass begins. It stops at `budget` picks (mid-pass) or when nothing is left. Every pass picks at least
    one row while a row with a tag is left, so rows with tags all come before rows without any (empty or
    None): those can never bring a new tag and are picked only by `fill` — after the tagged rows run out,
    the rest of the budget is filled with them in input order (`fill=False`: never picked).

    The first passes are that plain scan (a typical budget is met within the first, after a prefix of the
    rows). Once a pass picks fewer than half the rows still wanted, or after `_PLAIN_PASSES` passes, the
    rest switch to an index that never walks rows that cannot be picked: within a pass the next pick is
    the earliest unpicked row holding an uncovered tag, i.e. the smallest "first unpicked row" over the
    uncovered tags — a heap of one entry per tag still in an unpicked row, each entry's row found through
    a skip list (union-find with path compression) over the tag's postings. Such a pass costs O(L log L)
    for L such tags and picks ≥ L / k rows (k: most tags in a row; a pass ends only once every such tag is
    covered), so after at most `_PLAIN_PASSES` O(T) plain passes and the O(T log T) index (T: total tags;
    tag → id, sorting, postings) the later passes cost O(budget · k · log L + L) in all, however many there
    are — where plain scans cost O(T) per pass, O(N²) when each pass picks only a few rows.
    """
    n = len(tags)
    if budget <= 0 or n == 0:
        return []
    lengths = np.fromiter((0 if row is None else len(set(row)) for row in tags), dtype=np.int64, count=n)
    order = np.argsort(-lengths, kind="stable").tolist()  # scan position → row
    tagged = int(np.count_nonzero(lengths))
    picks: list[int] = []
    remaining = order[:tagged]
    last = 0  # picks of the last plain pass
    for plain in range(_PLAIN_PASSES + 1):
        wanted = budget - len(picks)
        if not remaining or plain == _PLAIN_PASSES or (plain and 2 * last < wanted):
            break
        left: list[int] = []
        covered: set = set()
        last = 0
        for i in remaining:
            row = tags[i]
            if covered.issuperset(row):
                left.append(i)
                continue
            picks.append(i)
            covered.update(row)
            last += 1
            if last == wanted:
                return picks
        remaining = left
    if remaining:
        row_of, flat, names = _encode([tags[i] for i in remaining], clean=False)
        sub_lengths = np.bincount(row_of, minlength=len(remaining))
        sub = _passes(flat, sub_lengths, np.arange(len(remaining)), len(remaining), len(names),
                      budget - len(picks))
        picks.extend(remaining[j] for j in sub)
    if fill and len(picks) < budget:
        picks.extend(order[tagged:tagged + budget - len(picks)])
    return picks


def _passes(flat: np.ndarray, lengths: np.ndarray, order: np.ndarray, tagged: int, n_tags: int,
            budget: int) -> list[int]:
    n = len(lengths)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    # the rows' tags in scan order: CSR over positions
    pos_len = lengths[order[:tagged]]
    pos_start = np.zeros(tagged + 1, dtype=np.int64)
    np.cumsum(pos_len, out=pos_start[1:])
    gather = np.repeat(starts[order[:tagged]] - pos_start[:-1], pos_len) + np.arange(pos_start[-1])
    pos_tags = flat[gather]
    pos_of = np.repeat(np.arange(tagged, dtype=np.int64), pos_len)
    # postings: each tag's positions, ascending (CSC); slot[e] = where element e of pos_tags sits in them
    by_tag = np.lexsort((pos_of, pos_tags))
    post_pos = pos_of[by_tag]
    post_start = np.zeros(n_tags + 1, dtype=np.int64)
    np.cumsum(np.bincount(pos_tags, minlength=n_tags), out=post_start[1:])
    slot = np.empty_like(by_tag)
    slot[by_tag] = np.arange(len(by_tag))
    # skip list over the postings: nxt[s] == s while unpicked; a picked slot points further on
    nxt = array("q", np.arange(len(post_pos) + 1, dtype=np.int64).tobytes())
    post_pos_l = array("q", post_pos.tobytes())
    post_start_l = post_start.tolist()
    pos_start_l = pos_start.tolist()
    pos_tags_l = array("q", pos_tags.tobytes())
    slot_l = array("q", slot.tobytes())
    order_l = order[:tagged].tolist()

    def find(s: int) -> int:
        root = s
        while nxt[root] != root:
            root = nxt[root]
        while nxt[s] != root:
            nxt[s], s = root, nxt[s]
        return root

    live = list(range(n_tags))
    picks: list[int] = []
    while len(picks) < budget:
        heap: list[int] = []
        still = []
        for t in live:
            s = find(post_start_l[t])
            if s < post_start_l[t + 1]:
                still.append(t)
                heap.append(post_pos_l[s] * n_tags + t)
        live = still
        if not heap:
            break
        heapq.heapify(heap)
        covered: set[int] = set()
        while heap and len(picks) < budget:
            p, t = divmod(heapq.heappop(heap), n_tags)
            if t in covered:
                continue
            picks.append(order_l[p])
            for e in range(pos_start_l[p], pos_start_l[p + 1]):
                covered.add(pos_tags_l[e])
                s = slot_l[e]
                nxt[s] = s + 1
    return picks
