"""The Markdown tables of ``benchmarks/scale.py``: cost per command and size, overhead over the raw work, growth.

Crash safety: pure functions over the result dictionary; nothing is written.
"""
from __future__ import annotations

from typing import Any

COMMANDS = ("write", "info", "index", "search", "classify", "merge", "duplicates")


def cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    if "wall_s" not in entry:
        return "failed: " + entry.get("error", "?")[:60].replace("|", "/")
    return (f"{entry['wall_s']:.2f} s / {entry['rss_gib']:.2f} GiB" + (" (extrapolated)" if "extrapolated" in entry else "")
            + ("" if entry["ok"] else " (some failed)"))


def _skipped(size: dict[str, Any], cmd: str, side: str) -> str:
    """Why a command was not measured at a size ("" when it was not skipped): disk, or a size limit."""
    skipped = size.get("skipped") or {}
    why = skipped.get(cmd) or (skipped.get(f"{cmd} raw") if side == "raw" else None)
    return "" if not why else ("not enough disk" if "GB free" in why else why)


def render(result: dict[str, Any]) -> str:
    """The Markdown tables: cost per command and size, overhead over the raw work, growth between sizes."""
    sizes = sorted(result["sizes"], key=lambda s: result["sizes"][s]["n"])
    m = result["machine"]
    heads = {result["sizes"][k].get("git_head") for k in sizes} - {None}
    code = result["code"] if len(heads) <= 1 and not any("remeasured" in result["sizes"][k] for k in sizes) \
        else "per size, see the JSON"
    lines = [f"{m.get('cpu')}, {m['cores_usable']} cores, {m['ram_gib']} GiB RAM; code: {code}; "
             f"median of {result['settings']['repeats']} cold processes (page cache warm); cells: wall s / peak RSS GiB",
             "", "| command | " + " | ".join(sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for cmd in COMMANDS:
        for side, label in (("embedstore", cmd), ("raw", f"{cmd} (raw)")):
            row = [result["sizes"][s].get("commands", {}).get(cmd, {}).get(side) for s in sizes]
            why = [_skipped(result["sizes"][s], cmd, side) for s in sizes]
            if any(row) or any(why):
                lines.append(f"| {label} | " + " | ".join(cell(c) if c or not w else f"skipped ({w})"
                                                          for c, w in zip(row, why)) + " |")
    lines.append("| recall@10 (index) | " + " | ".join(str(result["sizes"][s].get("recall_at_10", "-")) for s in sizes)
                 + " |")
    lines.append("| index factory | " + " | ".join(str(result["sizes"][s].get("index_factory", "-")) for s in sizes)
                 + " |")
    lines += ["", "Overhead over the raw work (embedstore / raw): wall x, RSS x", "",
              "| command | " + " | ".join(sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for cmd in COMMANDS:
        cells = []
        for s in sizes:
            e = result["sizes"][s].get("commands", {}).get(cmd, {})
            a, b = e.get("embedstore") or {}, e.get("raw") or {}
            cells.append(f"{a['wall_s'] / b['wall_s']:.1f}x / {a['rss_gib'] / b['rss_gib']:.1f}x"
                         if "wall_s" in a and "wall_s" in b and b["wall_s"] > 0 else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {cmd} | " + " | ".join(cells) + " |")
    if len(sizes) > 1:
        pairs = list(zip(sizes, sizes[1:]))
        lines += ["", "Growth between sizes (wall x, RSS x; rows grew by the size ratio)", "",
                  "| command | " + " | ".join(f"{a} -> {b} (x{result['sizes'][b]['n'] / result['sizes'][a]['n']:g})"
                                              for a, b in pairs) + " |", "|---|" + "---:|" * len(pairs)]
        for cmd in COMMANDS:
            cells = []
            for a, b in pairs:
                x = result["sizes"][a].get("commands", {}).get(cmd, {}).get("embedstore") or {}
                y = result["sizes"][b].get("commands", {}).get(cmd, {}).get("embedstore") or {}
                cells.append(f"{y['wall_s'] / x['wall_s']:.2f}x / {y['rss_gib'] / x['rss_gib']:.2f}x"
                             if "wall_s" in x and "wall_s" in y else "-")
            if any(c != "-" for c in cells):
                lines.append(f"| {cmd} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
