"""What a bundle's configs would import and run: installing a bundle means trusting its code.

MONAI bundle configs are programs: `_target_` names a class or function to import and call, `$…` strings are Python
expressions evaluated with the configs' imports. The zoo's hash checks prove a package is the one the index lists,
not that its code is harmless. `medpipe zoo install --allowed_modules medpipe,monai,torch` refuses a bundle whose
configs import or call anything outside the listed top-level modules (a static reading of the JSON files, so it
runs nothing); without the option, install says in one line what the user is trusting.
"""

from __future__ import annotations

import ast
import builtins
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError

# names MONAI's ConfigParser puts into every expression (monai, torch, numpy as np)
_EXPRESSION_GLOBALS = {"monai", "torch", "np", "numpy"}
# builtins no bundle config needs and a malicious one would use; every other builtin name is harmless here
_DANGEROUS = {"__import__", "eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "globals", "locals",
              "vars", "breakpoint", "input", "memoryview"}  # fmt: skip
_SAFE_BUILTINS = set(dir(builtins)) - _DANGEROUS
_REFERENCE = re.compile(r"[@%][\w#:]+")


def _strings(obj: Any, where: str) -> Iterator[tuple[str, str, str]]:
    """(where, key, string) for every string in a config, with the key it sits under."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, str):
                yield f"{where}#{key}", str(key), value
            else:
                yield from _strings(value, f"{where}#{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            if isinstance(value, str):
                yield f"{where}#{i}", "", value
            else:
                yield from _strings(value, f"{where}#{i}")


def expression_names(expression: str) -> set[str]:
    """Modules an expression imports and free names it reads (its own lambda / comprehension variables and
    `@references` excluded); dunder attribute access (`x.__class__`) shows as the attribute's name."""
    tree = ast.parse(_REFERENCE.sub("_reference_", expression.strip()), mode="exec")
    bound = {"_reference_"}
    for node in ast.walk(tree):
        if isinstance(node, ast.arguments):
            bound |= {a.arg for a in [*node.posonlyargs, *node.args, *node.kwonlyargs]}
            bound |= {a.arg for a in (node.vararg, node.kwarg) if a is not None}
        elif isinstance(node, ast.comprehension):
            bound |= {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".", 1)[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".", 1)[0])
        elif isinstance(node, ast.Name) and node.id not in bound:
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and node.attr.startswith("__"):
            names.add(node.attr)
    return names - _SAFE_BUILTINS


def config_modules(bundle_dir: str | Path) -> dict[str, set[str]]:
    """Top-level modules (or dangerous names) each place of the bundle's configs uses: {name: {config places}}.

    `_target_` values give their first dotted part (a bare name such as "UNet" is MONAI's); `$` expressions give
    what `expression_names` finds. An expression that is not Python is reported as '<unparsable>'."""
    found: dict[str, set[str]] = {}
    for path in sorted((Path(bundle_dir) / "configs").glob("*.json")):
        for where, key, text in _strings(json.loads(path.read_text()), path.name):
            if key == "_target_":
                used = {text.split(".", 1)[0] if "." in text else "monai"}
            elif text.startswith("$"):
                try:
                    used = expression_names(text[1:])
                except SyntaxError:
                    used = {"<unparsable>"}
            else:
                continue
            for name in used:
                found.setdefault(name, set()).add(where)
    return found


def check_allowed_modules(bundle_dir: str | Path, allowed: Sequence[str]) -> None:
    """Refuse, in one line, a bundle whose configs use a module outside `allowed` (plus what MONAI provides)."""
    permitted = set(allowed) | _EXPRESSION_GLOBALS
    outside = {name: places for name, places in config_modules(bundle_dir).items() if name not in permitted}
    if outside:
        name = sorted(outside)[0]
        more = f" (and {len(outside) - 1} more: {', '.join(sorted(outside)[1:4])})" if len(outside) > 1 else ""
        raise MedpipeError(
            f"bundle '{Path(bundle_dir).name}' uses '{name}' in {sorted(outside[name])[0]}{more}, outside "
            f"--allowed_modules {','.join(allowed)}; read its configs before trusting it, or widen the list"
        )


TRUST_NOTE = (
    "note: a bundle's configs are Python (`_target_` imports, `$` expressions); installing it means trusting its "
    "code as you would a package. `--allowed_modules medpipe,monai,torch,os` refuses configs that reach further."
)
