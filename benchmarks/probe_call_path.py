"""The call path of one ``pt.infonce(a, p, n)`` call, measured with ``sys.setprofile`` (issue 32's figures).

Prints, for each configuration:

* every Python frame entered in a ``pml_triplets`` module, in order (``module.function``);
* the module changes along the path, and the *returns to a module already left* (a module entered again, by a
  call or a return, after the path went elsewhere);
* the *stops* of the anchors: frames whose arguments reach the caller's ``anchors`` tensor (by identity: directly,
  or as an element or field of a tuple, list, dict, NamedTuple or dataclass, three levels deep), with the carrier
  it travelled in (``Batch.a``, ``tuple[0]``, ...);
* the *values carried beside the anchors*: at each stop, the other arguments and the other fields of the carriers
  that hold the anchors, by name (the union over the stops is counted);
* the *spine*: the stops whose arguments reach the caller's ``negatives`` tensor too (the frames the inputs travel
  through together, not a helper handed one tensor, nor the fused kernel's own frames), with the module path of
  those hops (caller module, then the stop's module), its returns to a module already left, and the values beside
  the anchors at the spine's stops.

Run from the repository root: ``python benchmarks/probe_call_path.py``. It measures whatever ``pml_triplets`` is
imported (put the checkout on ``PYTHONPATH``), so the same script gives the before and after figures.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch

import pml_triplets as pt

PACKAGE = str(Path(pt.__file__).parent)
KERNELS = {"_fused"}  # the fused cosine's autograd Function: computation, not a carrier (left out of the spine)


def _module(frame: FrameType) -> str | None:
    name = frame.f_code.co_filename
    return Path(name).stem if name.startswith(PACKAGE) else None


def _paths(value: object, target: torch.Tensor, depth: int = 3) -> Iterator[tuple[str, list[tuple[str, object]]]]:
    """Where ``target`` sits inside ``value``: (path, [(carrier field, sibling values)]) for each way to reach it."""
    if value is target:
        yield "", []
        return
    if depth == 0 or isinstance(value, torch.Tensor):
        return
    items: list[tuple[str, object]]
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple: its fields by name
        kind = type(value).__name__
        items = [(f"{kind}.{name}", getattr(value, name)) for name in value._fields]
    elif isinstance(value, (tuple, list)):
        kind = type(value).__name__
        items = [(f"{kind}[{i}]", v) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        items = [(f"dict[{k!r}]", v) for k, v in value.items() if isinstance(k, str)]
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind = type(value).__name__
        items = [(f"{kind}.{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]
    else:
        return
    for label, v in items:
        for path, siblings in _paths(v, target, depth - 1):
            yield label + ("." + path if path else ""), [(label, items), *siblings]


def probe(call: Callable[[torch.Tensor], object], anchors: torch.Tensor, negatives: torch.Tensor) -> dict[str, Any]:
    frames: list[str] = []
    spine: list[str] = []
    spine_path: list[str] = []
    spine_beside: set[str] = set()
    modules: list[str] = []  # the module of the innermost pml_triplets frame after each event
    stops: list[tuple[str, list[str]]] = []
    beside: set[str] = set()
    carriers: set[str] = set()

    def hook(frame: FrameType, event: str, arg: object) -> None:
        if event not in ("call", "return"):
            return
        if event == "call":
            module = _module(frame)
            if module is None:
                return
            frames.append(f"{module}.{frame.f_code.co_name}")
            if not modules or modules[-1] != module:
                modules.append(module)
            code = frame.f_code
            nargs = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 0x04) + bool(code.co_flags & 0x08)
            args = {name: frame.f_locals.get(name) for name in code.co_varnames[:nargs]}
            reached = [(name, path, sib) for name, v in args.items() for path, sib in _paths(v, anchors)]
            if reached:
                stops.append((f"{module}.{code.co_name}", [name + ("." + p if p else "") for name, p, _ in reached]))
                together = module not in KERNELS and any(True for v in args.values() for _ in _paths(v, negatives))
                found: set[str] = set()
                for name, _, siblings in reached:
                    found.update(f"{module}.{code.co_name}:{other}" for other in args if other != name)
                    for label, items in siblings:
                        carriers.add(label.split("[")[0].split(".")[0])
                        found.update(f"{label.split('.')[0].split('[')[0]}:{i}" for i, _ in items if i != label)
                beside.update(found)
                if together:
                    spine.append(f"{module}.{code.co_name}")
                    spine_beside.update(found)
                    caller = frame.f_back
                    while caller is not None and _module(caller) is None and caller.f_back is not None:
                        caller = caller.f_back
                    for hop in (_module(caller) if caller is not None else None, module):
                        if hop is not None and (not spine_path or spine_path[-1] != hop):
                            spine_path.append(hop)
        else:
            caller = frame.f_back
            while caller is not None and _module(caller) is None:
                caller = caller.f_back
            if caller is not None and _module(frame) is not None:
                module = _module(caller)
                assert module is not None
                if modules[-1] != module:
                    modules.append(module)

    sys.setprofile(hook)
    try:
        call(anchors)
    finally:
        sys.setprofile(None)
    # de-duplicate the values beside the anchors by their bare name (an argument, or a carrier's field)
    names = {v.split(":", 1)[1].split(".")[-1].split("[")[0] for v in beside}
    spine_names = {v.split(":", 1)[1].split(".")[-1].split("[")[0] for v in spine_beside}
    return {
        "spine": spine,
        "spine_path": spine_path,
        "spine_returns": _returns(spine_path),
        "spine_beside": sorted(spine_names),
        "frames": frames,
        "modules": modules,
        "changes": len(modules) - 1,
        "returns": _returns(modules),
        "stops": stops,
        "stop_modules": _dedupe([s.split(".")[0] for s, _ in stops]),
        "stop_returns": _returns(_dedupe([s.split(".")[0] for s, _ in stops])),
        "carriers": sorted(carriers),
        "beside": sorted(names),
    }


def _dedupe(seq: list[str]) -> list[str]:
    return [x for i, x in enumerate(seq) if i == 0 or seq[i - 1] != x]


def _returns(modules: list[str]) -> int:
    """How often the path enters a module it had already left."""
    return sum(1 for i, m in enumerate(modules) if m in modules[:i])


def report(title: str, out: dict[str, Any]) -> None:
    print(f"## {title}\n")
    print(f"* spine (stops reaching `anchors` and `negatives`): {len(out['spine'])} frames in "
          f"{len(set(out['spine_path']))} modules, {out['spine_returns']} returns to a module already left; "
          f"{len(out['spine_beside'])} values beside `anchors`")  # fmt: skip
    print(f"    - frames: {', '.join(out['spine'])}")
    print(f"    - path: {' > '.join(out['spine_path'])}")
    print(f"    - beside: {', '.join(out['spine_beside'])}")
    print(f"* frames in pml_triplets: {len(out['frames'])}; module changes: {out['changes']}; "
          f"returns to a module already left: {out['returns']}")  # fmt: skip
    print(f"* module path: {' > '.join(out['modules'])}")
    print(f"* stops of `anchors`: {len(out['stops'])} frames in {len(set(out['stop_modules']))} modules, "
          f"{out['stop_returns']} returns to a module already left")  # fmt: skip
    for where, how in out["stops"]:
        print(f"    - {where}({', '.join(how)})")
    print(f"* carriers holding `anchors`: {len(out['carriers'])}: {', '.join(out['carriers'])}")
    print(f"* values carried beside `anchors` (distinct names): {len(out['beside'])}: {', '.join(out['beside'])}")
    print(f"* all frames: {', '.join(out['frames'])}\n")


def main() -> None:
    torch.manual_seed(0)
    a, p, n = torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 4, 16)
    pt.infonce(a, p, n)  # warm: the options memo, lazy imports
    report("pt.infonce(a, p, n)", probe(lambda x: pt.infonce(x, p, n), a, n))
    pt.infonce(a, p, n, in_batch=True)
    report("pt.infonce(a, p, n, in_batch=True)", probe(lambda x: pt.infonce(x, p, n, in_batch=True), a, n))


if __name__ == "__main__":
    main()
