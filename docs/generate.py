"""Writes the docs pages' reference blocks from the code they describe.

Three pages mirror code, and their reference blocks are generated here, never edited by hand:

- ``docs/configuration.md``, block ``config-keys``: every key of the search YAML, from the pydantic
  models of :mod:`medpeft_ray.config` (key path, type and bounds, default, the field's
  ``description=``);
- ``docs/methods.md``, blocks ``methods-summary``, ``lr-ranges`` and ``methods``: the method
  registry (:mod:`medpeft_ray.methods`): families, options, default search spaces, promises;
- ``docs/cli.md``, block ``cli``: every command of the ``medpeft-ray`` typer app, read from
  click's own command objects, so the page does not depend on the terminal's width.

A block sits between ``<!-- generated: NAME; ... -->`` and ``<!-- end generated: NAME -->``;
hand-written prose around it is left alone. ``python docs/generate.py`` rewrites the blocks;
``python docs/generate.py --check`` rewrites nothing and exits 1 naming each stale page
(``tests/test_docs_pages.py`` runs the same check). Run it from the repository root with
medpeft-ray installed (``pip install -e .``) or ``PYTHONPATH=.``. Output is sorted and holds no
absolute path, so it is the same on every machine.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from medpeft_ray.cli import app
from medpeft_ray.config import SearchConfig
from medpeft_ray.methods import get_method, list_methods
from medpeft_ray.methods.registry import LR_KINDS, LR_RANGES

#: the checkout whose pages are written (run the script with this checkout's medpeft_ray importable:
#: ``pip install -e .``, or ``PYTHONPATH=.`` from the repository root)
REPO = Path(__file__).resolve().parents[1]

RULE = "edit the code, then run python docs/generate.py"
START = "<!-- generated: {name}; " + RULE + " -->"
END = "<!-- end generated: {name} -->"
BLOCK = re.compile(r"<!-- generated: (?P<name>[\w-]+);[^>]*-->\n(?P<body>.*?)<!-- end generated: (?P=name) -->",
                   re.DOTALL)


# Values and types as a YAML reader writes them.

def yaml_value(value: Any) -> str:
    """``value`` in YAML's flow style: ``null``, ``true``, ``[0.25, 1.0]``, ``{type: float, low: 0.001}``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return yaml_value(value.value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{yaml_value(k)}: {yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Path):
        return value.as_posix()
    return str(value)


def _bounds(metadata: list[Any]) -> list[str]:
    """``>= 1``, ``< 1``, ``at least 1 item`` from a field's annotated-types constraints."""
    words = []
    for item in metadata:
        for attribute, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attribute, None) is not None:
                words.append(f"{sign} {getattr(item, attribute)}")
        if getattr(item, "min_length", None):
            words.append(f"at least {item.min_length} item(s)")
    return words


def type_text(annotation: Any) -> str:
    """A short reader's name of a field's type: ``int``, ``list of float``, ``asha, hyperband or none``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        names = [yaml_value(a) for a in args]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(type_text(a) for a in args)
    if origin is typing.Annotated:
        inner = type_text(args[0])
        bounds = _bounds([m for extra in args[1:] for m in getattr(extra, "metadata", [extra])])
        return f"{inner} ({', '.join(bounds)})" if bounds else inner
    if origin in (list, tuple):
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        if not args or args[1] is Any:
            return "mapping"
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _sections_of(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation holds (``ConfirmConfig | None`` holds one)."""
    candidates = typing.get_args(annotation) if typing.get_args(annotation) else (annotation,)
    return [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]


def _default_text(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "" if isinstance(value, BaseModel) else yaml_value(value)
    if field.default is PydanticUndefined:
        return "required"
    return yaml_value(field.default)


def _cell(text: str) -> str:
    """Text fit for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def field_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, description) of every field of ``model`` and of its sections, in order."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        bounds = _bounds(field.metadata)
        kind = type_text(field.annotation) + (f" ({', '.join(bounds)})" if bounds else "")
        rows.append((key, kind, _default_text(field), field.description or ""))
        for section in _sections_of(field.annotation):
            rows.extend(field_rows(section, prefix=f"{key}."))
    return rows


def options_table(model: type[BaseModel], first_column: str) -> list[str]:
    lines = [f"| {first_column} | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, description in field_rows(model):
        lines.append(f"| `{key}` | {_cell(kind)} | {_cell(f'`{default}`' if default else '')} | {_cell(description)} |")
    return lines


# The blocks.

def config_keys() -> str:
    """Every key of the search YAML, section by section, from :class:`SearchConfig` and its sections."""
    lines = []
    rows = field_rows(SearchConfig)
    sections = [key for key, kind, _, _ in rows if "." not in key and kind == "section"]
    top = [row for row in rows if "." not in row[0] and row[0] not in sections]
    groups = [("top level", top)] + [(s, [r for r in rows if r[0] == s or r[0].startswith(f"{s}.")]) for s in sections]
    for title, group in groups:
        lines += [f"### {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, kind, default, description in group:
            if key == title:
                continue  # the heading names the section
            shown = f"`{default}`" if default and default != "required" else default
            lines.append(f"| `{key}` | {_cell(kind)} | {_cell(shown)} | {_cell(description)} |")
        lines.append("")
    return "\n".join(lines)


def methods_summary() -> str:
    """One row per registered method: the families it applies to and its one-line description."""
    lines = ["| method | applies to | what trains |", "|---|---|---|"]
    for name in list_methods():
        spec = get_method(name)
        lines.append(f"| [`{name}`](#{name}) | {', '.join(sorted(spec.families))} | "
                     f"{_cell(spec.description)} |")
    return "\n".join(lines) + "\n"


def lr_ranges() -> str:
    """The default learning-rate range of each kind of method, per optimizer."""
    optimizers = sorted(LR_RANGES)
    lines = ["| lr range | " + " | ".join(optimizers) + " | methods |", "|---" * (len(optimizers) + 2) + "|"]
    for kind in LR_KINDS:
        ranges = [f"{LR_RANGES[o][kind]['low']:g} – {LR_RANGES[o][kind]['high']:g}" for o in optimizers]
        methods = ", ".join(f"`{n}`" for n in list_methods() if get_method(n).lr == kind)
        lines.append(f"| {kind} | " + " | ".join(ranges) + f" | {methods} |")
    return "\n".join(lines) + "\n"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def methods_reference() -> str:
    """Each method: what it promises, its options and its default search space per family."""
    lines = []
    for name in list_methods():
        spec = get_method(name)
        families = sorted(spec.families)
        promises = [spec.lr, _yes(spec.identity_at_init), _yes(spec.merge is not None), _yes(spec.peft_native)]
        lines += [f"### {name}", "", spec.description, "",
                  "| applies to | lr range | identity at init | mergeable | peft adapter format |",
                  "|---|---|---|---|---|",
                  "| " + " | ".join([", ".join(families), *promises]) + " |", ""]
        if spec.options.model_fields:
            lines += options_table(spec.options, "option") + [""]
        else:
            lines += ["No options.", ""]
        lines.append("Default search space (AdamW's lr range; under SGD the lr row of the table above):")
        lines.append("")
        spaces = {family: spec.space_for(family) for family in families}
        shared = {k: v for k, v in spaces[families[0]].items() if all(s.get(k) == v for s in spaces.values())}
        for key in sorted(shared):
            lines.append(f"- `{key}`: `{yaml_value(shared[key])}`")
        for family in families:
            for key in sorted(set(spaces[family]) - set(shared)):
                lines.append(f"- `{key}` on {family}: `{yaml_value(spaces[family][key])}`")
        lines.append("")
    return "\n".join(lines)


def _value_kind(param: Any, ctx: Any) -> str:
    """What an option takes: ``flag``, or its value's type (``int``, ``path``, ``table|json``)."""
    if getattr(param, "is_flag", False):
        return "flag"
    click_type = getattr(param, "type", None)  # click's own parameters; typer's newer ones describe themselves
    kind = str(getattr(click_type, "name", click_type)) if click_type is not None else param.display_type(ctx).strip("<>")
    if kind.endswith(" range"):  # a bounded number: say the bounds instead
        kind = kind.removesuffix(" range").removesuffix("eger")
        low, high = (getattr(param, bound, getattr(click_type, bound, None)) for bound in ("min", "max"))
        bounds = [f"{sign} {value}" for sign, value in ((">=", low), ("<=", high)) if value is not None]
        kind += f" ({', '.join(bounds)})" if bounds else ""
    return kind


def _default(param: Any) -> str:
    if param.required:
        return "required"
    if getattr(param, "is_flag", False) or param.default in (None, [], ()):
        return ""
    return f"`{yaml_value(param.default)}`"


def _command_lines(command: Any, path: str) -> list[str]:
    lines = [f"### `{path}`", "", (command.help or "").strip(), ""]
    ctx = command.make_context(path, [], resilient_parsing=True)
    params = [p for p in command.params if not getattr(p, "hidden", False)]
    if params:
        lines += ["| argument | takes | default | meaning |", "|---|---|---|---|"]
        for param in params:
            if param.param_type_name == "argument":
                names = f"`{param.name.upper()}`" + ("..." if param.nargs != 1 else "")
            else:
                names = ", ".join(f"`{opt}`" for opt in sorted(param.opts, key=lambda o: (not o.startswith("--"), o)))
            lines.append(f"| {names} | {_cell(_value_kind(param, ctx))} | {_default(param)} | "
                         f"{_cell(getattr(param, 'help', None) or '')} |")
        lines.append("")
    for name in sorted(getattr(command, "commands", {})):
        lines += _command_lines(command.commands[name], f"{path} {name}")
    return lines


def cli_reference() -> str:
    """Every command and sub-command of ``medpeft-ray`` with its arguments, from click's objects."""
    root = typer.main.get_command(app)
    lines = []
    for name in sorted(root.commands):
        lines += _command_lines(root.commands[name], f"medpeft-ray {name}")
    return "\n".join(lines)


#: page (relative to the repository) -> block name -> what writes it
PAGES: dict[str, dict[str, Callable[[], str]]] = {
    "docs/configuration.md": {"config-keys": config_keys},
    "docs/methods.md": {"methods-summary": methods_summary, "lr-ranges": lr_ranges, "methods": methods_reference},
    "docs/cli.md": {"cli": cli_reference},
}


def render(text: str, blocks: dict[str, Callable[[], str]], page: str = "page") -> str:
    """``text`` with each generated block rewritten.

    Raises:
        ValueError: a block the page should hold is missing.
    """
    found = {match["name"] for match in BLOCK.finditer(text)}
    missing = sorted(set(blocks) - found)
    if missing:
        raise ValueError(f"{page}: no generated block {', '.join(missing)} (mark it with {START.format(name=missing[0])})")

    def rewrite(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in blocks:
            return match[0]
        body = blocks[name]().rstrip("\n") + "\n"
        return f"{START.format(name=name)}\n{body}{END.format(name=name)}"

    return BLOCK.sub(rewrite, text)


def stale_pages(root: Path = REPO) -> list[str]:
    """The pages under ``root`` whose generated blocks differ from what the code gives today."""
    return [page for page, blocks in PAGES.items()
            if render((root / page).read_text(), blocks, page) != (root / page).read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each stale page")
    parser.add_argument("--root", type=Path, default=REPO, help="the repository whose pages to check or write")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages(args.root)
        for page in stale:
            print(f"{page} is stale: run python docs/generate.py", file=sys.stderr)
        return 1 if stale else 0
    for page, blocks in PAGES.items():
        path = args.root / page
        text = path.read_text()
        new = render(text, blocks, page)
        if new != text:
            path.write_text(new)
            print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
