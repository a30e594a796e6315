"""What each instruction of an optimized XLA module moves and which model code it came from, read from the text
dump XLA writes with ``xla_dump_to`` (``*after_optimizations.txt``). No JAX import: the dump is plain text.

For every instruction of every computation that is not fused away (fusions, custom calls for cuBLAS/cuDNN/Triton,
copies, ...): the bytes of its result and of its operands, and where it came from, from the ``op_name`` metadata of
the instructions inside it: the Flax module path (``levels_2/blocks_3/mlp/fc1``) and whether it is part of the
backward pass (JAX names those ``transpose(jvp(...))``).
"""

from __future__ import annotations

import collections
import dataclasses
import re

DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPERANDS = re.compile(r"%([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_LAYOUT = re.compile(r"\{[^{}]*\}")  # an array's layout, e.g. {2,1,0} or {1,0:T(8,128)}


def array_bytes(text: str) -> int:
    """Bytes of every ``dtype[dims]`` array in ``text`` (a shape, or a tuple of shapes)."""
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * DTYPE_BYTES[dtype]
    return total


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    result_bytes: int
    result: str  # the result's arrays, layouts dropped: "bf16[128,196,512]" or "(f32[512], bf16[128,196,512])"
    operand_bytes: int
    calls: str | None  # the fused computation, for fusions
    target: str | None  # custom_call_target, for custom calls
    op_names: list[str]  # op_name metadata of the instruction (and, after link(), of its fused computation)
    operands: list[str]  # operand instruction names

    @property
    def bytes(self) -> int:
        return self.result_bytes + self.operand_bytes


def _split_shape(rhs: str) -> tuple[str, str]:
    """``"bf16[2,3]{1,0} fusion(...), kind=..."`` -> (shape text, the rest starting at the opcode)."""
    depth = 0
    for i, ch in enumerate(rhs):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == " " and depth == 0:
            return rhs[:i], rhs[i + 1 :]
    return rhs, ""


def _operand_text(rest: str) -> str:
    """The parenthesised operand list right after the opcode."""
    start = rest.find("(")
    if start < 0:
        return ""
    depth = 0
    for i in range(start, len(rest)):
        if rest[i] == "(":
            depth += 1
        elif rest[i] == ")":
            depth -= 1
            if depth == 0:
                return rest[start + 1 : i]
    return rest[start + 1 :]


def parse_module(text: str) -> dict[str, dict[str, Instruction]]:
    """``{computation name: {instruction name: Instruction}}`` of an HLO module's text."""
    computations: dict[str, dict[str, Instruction]] = {}
    current = None
    for line in text.splitlines():
        if line and not line[0].isspace():  # a computation's header, the module's header, or a closing brace
            header = line.rstrip().endswith("{") and not line.startswith("HloModule")
            name = line.removeprefix("ENTRY ").lstrip("%").split()[0]
            current = computations.setdefault(name, {}) if header else None
            continue
        if current is None:
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, rhs = match.groups()
        shape, rest = _split_shape(rhs)
        opcode = re.match(r"[\w\-]+", rest)
        operands = _operand_text(rest)
        typed = array_bytes(operands)
        names = _OPERANDS.findall(operands)
        calls = _CALLS.search(rest)
        target = _TARGET.search(rest)
        current[name] = Instruction(
            name=name,
            opcode=opcode.group(0) if opcode else "",
            result_bytes=array_bytes(shape),
            result=_LAYOUT.sub("", shape),
            operand_bytes=typed if typed else -len(names),  # untyped operand lists are resolved in link()
            calls=calls.group(1) if calls else None,
            target=target.group(1) if target else None,
            op_names=_OP_NAME.findall(rest),
            operands=names,
        )
    return computations


def link(computations: dict[str, dict[str, Instruction]]) -> dict[str, Instruction]:
    """Instructions of the non-fused computations by name, each with operand bytes resolved (for dumps that print
    operands without their shapes) and with the op_names of its fused computation added."""
    fused = {i.calls for comp in computations.values() for i in comp.values() if i.opcode == "fusion" and i.calls}
    linked = {}
    for cname, comp in computations.items():
        if cname in fused:
            continue
        for inst in comp.values():
            if inst.operand_bytes < 0:
                inst.operand_bytes = sum(comp[o].result_bytes for o in inst.operands if o in comp)
            if inst.calls in computations and inst.opcode == "fusion":
                inst.op_names = inst.op_names + [n for i in computations[inst.calls].values() for n in i.op_names]
            linked[inst.name] = inst
    return linked


_NOT_MODULES = {"while", "body", "cond", "closed_call", "MambaVision", "step", "loss_fn"}


def module_path(op_name: str) -> tuple[str, bool]:
    """``"jit(step)/transpose(jvp(MambaVision))/MambaVision._stages/levels_2/blocks_3/mlp/fc1/dot_general"`` ->
    ``("levels_2/blocks_3/mlp/fc1", True)``: the Flax module path and whether the op belongs to the backward pass.
    Dropped: the primitive (last part), wrappers (``jit(...)``, ``jvp(...)``), method names (``Conv3x3.__call__``),
    loop plumbing (``while/body/closed_call``) and JAX internals (``_bernoulli``)."""
    backward = "transpose(" in op_name
    parts = [
        p
        for p in op_name.split("/")[:-1]
        if p and "(" not in p and "." not in p and not p.startswith("_") and p not in _NOT_MODULES
    ]
    return "/".join(parts), backward


def origin(inst: Instruction) -> tuple[str, bool]:
    """The most common module path among an instruction's op_names, and whether it belongs to the backward pass
    (any of its ops does: a backward fusion often recomputes forward ops, a forward one holds no backward op)."""
    if not inst.op_names:
        return "", False
    paths = collections.Counter(module_path(n)[0] for n in inst.op_names)
    return paths.most_common(1)[0][0], any(module_path(n)[1] for n in inst.op_names)


def group_of(path: str) -> str:
    """A coarse place in the model for a module path: ``levels_2/blocks_3/mlp/fc1`` -> ``levels_2/mlp``,
    ``levels_0/blocks_1/norm1`` -> ``levels_0/norm1``; the optimizer and loss have no levels part."""
    parts = path.split("/")
    if parts and parts[0].startswith("levels_"):
        rest = [p for p in parts[1:] if not p.startswith("blocks_")]
        return "/".join([parts[0]] + rest[:1])
    return parts[0] if parts and parts[0] else "(step: optimizer, loss, casts)"
