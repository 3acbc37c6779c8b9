"""`tamis ops`: every operator a recipe can name, generated from the registry and the kernel table
(plug-ins included), so the list can never drift from what `check` accepts and `run` runs."""

from __future__ import annotations

from typing import Any

from tamis.dsl import registry as reg
from tamis.ops.kernel import kernel_for

FAMILIES = {"scorer": "scorers", "sampler": "samplers", "function": "functions",
            "model": "model constructors", "data": "data constructors"}


def _param(p: reg.Param) -> dict[str, Any]:
    return {"name": p.name, "type": p.type, "required": p.required,
            "default": None if p.required else p.default, "choices": list(p.choices) if p.choices else None,
            "doc": p.doc}


def entries() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for s in reg.SCORERS.values():
        out.append({"family": "scorer", "name": s.name, "doc": s.doc, "params": [_param(p) for p in s.params],
                    "model": s.model, "columns": s.columns, "source": s.source})
    for s in reg.SAMPLERS.values():
        out.append({"family": "sampler", "name": s.name, "doc": s.doc, "params": [_param(p) for p in s.params],
                    "model": s.model, "source": s.source})
    for f in reg.FUNCTIONS.values():
        out.append({"family": "function", "name": f.name, "doc": f.doc, "args": list(f.args), "returns": f.returns,
                    "aggregate": f.aggregate})
    for m in reg.MODEL_CTORS.values():
        if m.name != "lora":
            out.append({"family": "model", "name": m.name, "doc": m.doc, "params": [_param(p) for p in m.params],
                        "llm": m.llm, "trained": m.trained, "api": m.api})
    for d in reg.DATA_CTORS.values():
        out.append({"family": "data", "name": d.name, "doc": d.doc, "params": [_param(p) for p in d.params],
                    "llm_generated": d.llm_generated})
    for e in out:
        k = kernel_for(e["family"], e["name"])  # type: ignore[arg-type]
        e["runnable"] = k is not None
        e["kernel"] = k.describe() if k else None
    return out


def _signature(e: dict[str, Any]) -> str:
    if e["family"] == "function":
        return f"{e['name']}({', '.join(e['args'])}) -> {e['returns']}"
    parts = []
    for p in e.get("params", []):
        parts.append(p["name"] if p["required"] else f"{p['name']}={p['default']!r}")
    return f"{e['name']}({', '.join(parts)})"


def text(items: list[dict[str, Any]], detail: bool = False) -> str:
    lines: list[str] = []
    for family, title in FAMILIES.items():
        group = [e for e in items if e["family"] == family]
        if not group:
            continue
        lines.append(f"{title}:")
        for e in group:
            mark = "" if e["runnable"] else "  [no local runtime yet]"
            lines.append(f"  {_signature(e)}{mark}")
            lines.append(f"      {e['doc']}")
            if detail:
                if e.get("model"):
                    lines.append(f"      needs a model: {e['model']} (`using …`)")
                if e.get("columns"):
                    lines.append("      columns: " + ", ".join(f"NAME{k} ({v})" for k, v in e["columns"].items()))
                for p in e.get("params", []):
                    choices = f" one of {', '.join(map(str, p['choices']))}" if p["choices"] else ""
                    lines.append(f"      {p['name']}: {p['type']}{choices}" + (f" — {p['doc']}" if p["doc"] else ""))
                if e.get("source"):
                    lines.append(f"      reference code: {e['source']}")
                if e["kernel"]:
                    k = e["kernel"]
                    lines.append(f"      kernel: {k['kernel']} ({k['mode']}{', cached' if k['cached'] else ''})")
    return "\n".join(lines)
