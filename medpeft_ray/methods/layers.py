"""Which layers a method tunes: block sets and projection sets, as readable searchable values.

A block set is ``all``, ``first:K``, ``last:K``, ``every:K`` (every K-th block from the first),
a list of indices, or the same list as a comma string (``"0,4,8"``). A projection set is a list
or a comma string (``"q,v"``). Strings keep Optuna's storage and the leaderboard readable, so a
search can use them as categorical choices (``blocks: {type: categorical, choices: [all, "last:4"]}``).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator

from medpeft_ray.methods.registry import MethodOptions
from medpeft_ray.models.families import get_family, list_families

_BLOCK_FORM = re.compile(r"^(all|(first|last|every):(\d+)|\d+(\s*,\s*\d+)*)$")


def parse_block_set(value: Any) -> str | list[int]:
    """Normalises a block set: ``all``/``first:K``/``last:K``/``every:K`` stay strings, the rest a sorted list."""
    if value is None:
        return "all"
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str):
        text = value.strip().lower()
        if not _BLOCK_FORM.match(text):
            raise ValueError(f"{value!r} is not a block set: use all, first:K, last:K, every:K or indices like '0,4,8'")
        if text == "all" or ":" in text:
            if ":" in text and int(text.split(":")[1]) < 1:
                raise ValueError(f"{value!r}: K must be at least 1")
            return text
        value = [int(part) for part in text.split(",")]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if any(v < 0 for v in value):
            raise ValueError(f"block indices must be >= 0, got {list(value)}")
        return sorted(set(value))
    raise ValueError(f"{value!r} is not a block set: use all, first:K, last:K, every:K or a list of indices")


def resolve_blocks(block_set: str | list[int], depth: int) -> list[int]:
    """The block indices a block set names in a ``depth``-block backbone.

    Raises:
        ValueError: an index past the last block, or K larger than the depth.
    """
    if block_set == "all":
        return list(range(depth))
    if isinstance(block_set, str):
        kind, k = block_set.split(":")
        k = int(k)
        if kind != "every" and k > depth:
            raise ValueError(f"blocks {block_set!r}: the backbone has only {depth} blocks")
        return {"first": list(range(k)), "last": list(range(depth - k, depth)), "every": list(range(0, depth, k))}[kind]
    bad = [b for b in block_set if b >= depth]
    if bad:
        raise ValueError(f"blocks: {bad} out of range for a {depth}-block backbone")
    return list(block_set)


def parse_name_set(value: Any, known: tuple[str, ...] | None = None) -> list[str]:
    """A list or comma string of names, de-duplicated in ``known``'s order when given."""
    names = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"must be a non-empty list of names or a comma string, got {value!r}")
    if known is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown {', '.join(map(repr, unknown))}; choose among {', '.join(known)}")
        return [n for n in known if n in names]
    return list(dict.fromkeys(names))


class BlockOptions(MethodOptions):
    """Options of methods that act on a chosen set of blocks (block sets: families whose blocks have an index)."""

    blocks: str | list[int] = Field("all", description="blocks to tune: all, first:K, last:K, every:K or indices")

    @field_validator("blocks", mode="before")
    @classmethod
    def _blocks(cls, value: Any) -> str | list[int]:
        return parse_block_set(value)

    def check_family(self, family: str) -> None:
        if not get_family(family).block_sets and self.blocks != "all":
            indexed = " and ".join(get_family(name).title for name in list_families() if get_family(name).block_sets)
            raise ValueError(f"blocks: block sets apply to {indexed} backbones only")


def chosen_blocks(model: Any, options: BlockOptions, family: str) -> list[tuple[int, Any]]:
    """(index, block) of every block of a ``family`` backbone the options choose."""
    blocks = get_family(family).blocks(model)
    return [(i, blocks[i]) for i in resolve_blocks(options.blocks, len(blocks))]
