"""Collectives of an optimized HLO module (`compiled.as_text()`), by kind, per step.

A scanned model runs its layer body inside a `while` loop, and the HLO holds that body
once; counting instructions in the text would undercount by the layer count. So the
module is walked as a call graph from ENTRY, each called computation weighted by how often
its caller runs it:

* a `while` body (and condition) runs trip-count times: the trip count is the
  `known_trip_count` of the while's backend_config when XLA records one, else read from the
  loop condition `compare(get-tuple-element(param), constant(N)), direction=LT` (or LE: N + 1)
  minus the induction variable's constant start in the while's init tuple; loops whose
  bound is data-dependent (e.g. dropless expert loops) count once and are reported in
  `unknown_trip_counts`;
* every other called computation (fusions, async wrappers, branches, reducers) runs once
  per call; both branches of a conditional count (an upper bound).

Bytes of one collective, per device (the buffer it moves or produces): all-gather,
all-reduce, all-to-all, ragged-all-to-all, collective-permute and collective-broadcast:
their result; reduce-scatter: its operand (the unreduced buffer). XLA:TPU writes a
reduce-scatter as an `all-reduce` whose only use is its computation's ROOT `dynamic-slice`
(a computation named `all-reduce-scatter...`, run as one reduce-scatter); such an
all-reduce counts as a reduce-scatter of its operand. An async pair
(`all-gather-start` / `all-gather-done`) counts once, at its `-done`, whose result is the
collective's output; an `async-start` wrapper's called computation holds the collective.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
         "collective-permute", "collective-broadcast")
BYTES_PER_ELEMENT = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2,
    "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8,
    "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1,
    "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "f8e3m4": 1, "f4e2m1fn": 0.5, "f8e8m0fnu": 1,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEES = re.compile(r"\b(condition|body|calls|to_apply|true_computation|false_computation"
                      r"|branch_computations|called_computations)=(\{[^}]*\}|%?[\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str  # result type text: 'f32[8,128]{1,0}' or a tuple '(s32[], f32[8])'
    opcode: str
    operands: tuple[str, ...]
    arguments: str  # the text between the opcode's parentheses ('4' for constant(4))
    attributes: str  # everything after the operand list
    is_root: bool = False


@dataclasses.dataclass
class CollectiveStats:
    """Per-step totals by kind: how many collectives ran and their bytes per device."""
    counts: dict[str, int]
    bytes: dict[str, int]
    unknown_trip_counts: int  # while loops whose trip count could not be read (counted once)


def shape_bytes(shape: str) -> int:
    """Bytes of every array in a result type (a tuple's arrays summed, layouts ignored)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in BYTES_PER_ELEMENT:
            total += BYTES_PER_ELEMENT[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start] ('(' or '{')."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    depth = 0
    for i in range(start, len(text)):
        if text[i] in pairs:
            depth += 1
        elif text[i] in pairs.values():
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _parse_instruction(line: str) -> Instruction | None:
    match = _INSTRUCTION.match(line)
    if not match:
        return None
    root, name, rest = match.groups()
    rest = re.sub(r"/\*.*?\*/", "", rest)
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.find(" ")
    shape, tail = rest[:end], rest[end:].lstrip()
    paren = tail.find("(")
    if paren < 0:
        return None
    opcode = tail[:paren].strip()
    close = _balanced(tail, paren)
    arguments = tail[paren + 1:close - 1]
    operands = tuple(re.findall(r"%([\w.\-]+)", arguments))
    return Instruction(name, shape, opcode, operands, arguments, tail[close:], bool(root))


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """({computation name: instructions}, name of the ENTRY computation)."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if current is None or line.strip() == "}":
            continue
        instruction = _parse_instruction(line)
        if instruction is not None:
            computations[current].append(instruction)
    if not entry:
        raise ValueError("HLO text has no ENTRY computation.")
    return computations, entry


def _callees(instruction: Instruction) -> list[tuple[str, str]]:
    """(attribute, computation name) for every computation the instruction calls."""
    out = []
    for attribute, value in _CALLEES.findall(instruction.attributes):
        for name in re.findall(r"%?([\w.\-]+)", value.strip("{}")):
            out.append((attribute, name))
    return out


def _constant(instruction: Instruction | None) -> int | None:
    if instruction is None or instruction.opcode != "constant":
        return None
    match = re.fullmatch(r"\s*(-?\d+)\s*", instruction.arguments)
    return None if match is None else int(match.group(1))


def trip_count(loop: Instruction, computations: dict[str, list[Instruction]],
               by_name: dict[str, Instruction]) -> int | None:
    """Iterations of a `while`, or None when its bound is not a compile-time constant."""
    known = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', loop.attributes)
    if known:
        return int(known.group(1))
    condition = dict(_callees(loop)).get("condition")
    body = computations.get(condition or "", [])
    local = {i.name: i for i in body}
    root = next((i for i in body if i.is_root), None)
    if root is None or root.opcode != "compare" or len(root.operands) != 2:
        return None
    direction = re.search(r"direction=(\w+)", root.attributes)
    if direction is None:
        return None
    counter, bound = (local.get(n) for n in root.operands)
    comparison = direction.group(1)
    if counter is not None and counter.opcode == "constant":  # bound > counter
        counter, bound = bound, counter
        comparison = {"GT": "LT", "GE": "LE"}.get(comparison, "")
    if counter is None or counter.opcode != "get-tuple-element":
        return None
    limit = _constant(bound)
    if limit is None:
        return None
    index = re.search(r"index=(\d+)", counter.attributes)  # the induction variable
    start = 0
    init = by_name.get(loop.operands[0]) if loop.operands else None
    if index and init is not None and init.opcode == "tuple":
        position = int(index.group(1))
        if position < len(init.operands):
            value = _constant(by_name.get(init.operands[position]))
            start = 0 if value is None else value
    steps = {"LT": limit - start, "LE": limit - start + 1}.get(comparison)
    return None if steps is None else max(steps, 0)


def _kind(opcode: str) -> str | None:
    """The collective kind an instruction counts for (None: not counted here)."""
    if opcode.endswith("-start"):
        return None  # counted at its -done
    base = opcode[:-len("-done")] if opcode.endswith("-done") else opcode
    return base if base in KINDS else None


def _sliced_all_reduces(body: list[Instruction]) -> set[str]:
    """The all-reduces of a computation whose ROOT is a dynamic-slice of them and that
    have no other use: XLA:TPU's reduce-scatter (see the module docstring)."""
    root = next((i for i in body if i.is_root), None)
    if root is None or root.opcode != "dynamic-slice" or not root.operands:
        return set()
    source = root.operands[0]
    uses = sum(source in i.operands for i in body)
    return {i.name for i in body if i.name == source and i.opcode == "all-reduce"
            and uses == 1}


def collective_stats(text: str) -> CollectiveStats:
    """Collectives per step of an optimized HLO module, loop bodies times their trip counts."""
    computations, entry = parse_module(text)
    by_name = {i.name: i for body in computations.values() for i in body}
    unknown: set[str] = set()

    @functools.lru_cache(maxsize=None)
    def walk(name: str) -> tuple[tuple[str, int, int], ...]:
        counts: dict[str, list[int]] = {}

        def add(kind: str, count: int, size: int) -> None:
            total = counts.setdefault(kind, [0, 0])
            total[0] += count
            total[1] += size

        scattered = _sliced_all_reduces(computations.get(name, []))
        for instruction in computations.get(name, []):
            kind = _kind(instruction.opcode)
            if kind == "all-reduce" and instruction.name in scattered:
                kind = "reduce-scatter"
            if kind is not None:
                if kind == "reduce-scatter":
                    size = sum(shape_bytes(by_name[o].shape) for o in instruction.operands
                               if o in by_name)
                else:
                    size = shape_bytes(instruction.shape)
                add(kind, 1, size)
            if instruction.opcode in ("async-update", "async-done"):
                continue  # the async-start already walked the wrapped computation
            times = 1
            if instruction.opcode == "while":
                trips = trip_count(instruction, computations, by_name)
                if trips is None:
                    unknown.add(instruction.name)
                times = 1 if trips is None else trips
            for _, callee in _callees(instruction):
                for sub_kind, sub_count, sub_bytes in walk(callee):
                    add(sub_kind, sub_count * times, sub_bytes * times)
        return tuple((k, c, b) for k, (c, b) in counts.items())

    totals = walk(entry)
    return CollectiveStats(counts={k: c for k, c, _ in totals},
                           bytes={k: b for k, _, b in totals},
                           unknown_trip_counts=len(unknown))


if __name__ == "__main__":  # python -m moejax.hlo_stats module.txt
    import sys
    with open(sys.argv[1], encoding="utf-8") as handle:
        print(json.dumps(dataclasses.asdict(collective_stats(handle.read())), indent=1))
