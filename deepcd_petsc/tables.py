"""Markdown tables for results (CLI, examples, benchmarks, model cards)."""


def _fmt(v):
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.3f}"
    return str(v)


def markdown_table(rows, columns, headers=None):
    """rows: list of dicts; columns: keys to show, in order."""
    headers = headers or columns
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c) for c in cells]
    return "\n".join(out)
