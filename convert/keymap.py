"""Key tables and conversion plans.

A `KeyTable` says how one foreign checkpoint format names each tensor of ours: global tensors one to one, block
tensors by their suffix inside a block (possibly several foreign tensors stacked along dim 0 into one of ours, e.g.
q/k/v -> Wqkv). A *plan* maps every output key to a `Step` (its input keys and a function of those tensors); the
import plan and the export plan are both derived from the same table. Plans are applied eagerly to a state dict
(`apply_plan`), lazily one tensor at a time (`iter_plan`, used by the shard writer), or to meta tensors
(`plan_specs`) to learn output shapes without touching any data.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from modeling_recurrent import RecurrentDepthConfig, RecurrentDepthForCausalLM

# Our block prefixes, e.g. "transformer.core_block.3."; everything of a block lives under one of them.
OUR_BLOCK = re.compile(r"^(transformer\.(?:prelude|core_block|coda)\.\d+\.)(.+)$")
OUR_HEAD = "lm_head.weight"


class KeyMismatchError(ValueError):
    """Keys that a conversion needs but the checkpoint lacks, and keys it has that the conversion does not know."""

    def __init__(self, what: str, missing: Iterable[str] = (), unknown: Iterable[str] = ()):
        self.missing, self.unknown = sorted(missing), sorted(unknown)
        lines = [f"{what}: the checkpoint does not match the expected keys"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unknown:
            lines.append(f"  unknown ({len(self.unknown)}): " + ", ".join(self.unknown))
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Fused:
    """Several foreign tensors stacked along dim 0 into one of ours; `sizes(config)` gives each part's rows."""

    keys: tuple[str, ...]
    sizes: Callable[[RecurrentDepthConfig], tuple[int, ...]]


ForeignName = str | Fused


@dataclass(frozen=True)
class Step:
    """How one output tensor is made.

    `fn(*inputs)` of the tensors named in `sources`; a step without sources generates its tensor as
    `fn(dtype=, device=)` with the dtype and device of the tensor named `like`.
    """

    sources: tuple[str, ...]
    fn: Callable[..., torch.Tensor]
    like: str | None = None


Plan = dict[str, Step]


def identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def stack_rows(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


def split_rows(sizes: tuple[int, ...], index: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def part(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.split(list(sizes), dim=0)[index].clone()

    return part


@dataclass(frozen=True)
class KeyTable:
    """Names of our tensors in one foreign format: `globals` by full key, `block` by suffix inside a block.

    `ignored` are regular expressions of foreign keys without a counterpart of ours (dropped on import, e.g. a
    stored RoPE table). A foreign head tied to the embeddings (`globals[OUR_HEAD]`) is dropped on import too.
    """

    name: str
    globals: Mapping[str, str]
    block: Mapping[str, ForeignName]
    ignored: tuple[str, ...] = field(default=())

    def foreign_suffixes(self) -> set[str]:
        names: set[str] = set()
        for theirs in self.block.values():
            names.update(theirs.keys if isinstance(theirs, Fused) else (theirs,))
        return names

    def pairs(self, our_keys: Iterable[str], blocks: Mapping[str, str]) -> dict[str, ForeignName]:
        """Foreign name of each of our keys; `blocks` maps our block prefixes to foreign block prefixes."""
        out = {ours: self.foreign_name(ours, blocks) for ours in our_keys}
        unmapped = [ours for ours, theirs in out.items() if theirs is None]
        if unmapped:
            raise KeyMismatchError(f"{self.name} key table has no entry for", unknown=unmapped)
        return out  # type: ignore[return-value]

    def foreign_name(self, ours: str, blocks: Mapping[str, str]) -> ForeignName | None:
        match = OUR_BLOCK.match(ours)
        if match is None:
            return self.globals.get(ours)
        prefix, suffix = match.groups()
        name = self.block.get(suffix)
        if name is None or prefix not in blocks:
            return None
        foreign = blocks[prefix]
        if isinstance(name, Fused):
            return Fused(tuple(foreign + k for k in name.keys), name.sizes)
        return foreign + name


def expected_state(config: RecurrentDepthConfig) -> dict[str, torch.Tensor]:
    """Our state dict for `config` as meta tensors (the tied head omitted, as saved)."""
    with torch.device("meta"):
        model = RecurrentDepthForCausalLM(config)
    state = dict(model.state_dict())
    if config.tie_word_embeddings:
        state.pop(OUR_HEAD, None)
    return state


def block_prefixes(config: RecurrentDepthConfig) -> list[str]:
    """Our block prefixes in model order: prelude, core, coda."""
    phases = (("prelude", config.n_prelude), ("core_block", config.n_core), ("coda", config.n_coda))
    return [f"transformer.{phase}.{i}." for phase, n in phases for i in range(n)]


def import_plan(
    table: KeyTable,
    foreign_keys: Iterable[str],
    config: RecurrentDepthConfig,
    blocks: Mapping[str, str],
    dropped_blocks: Iterable[str] = (),
    generated: Iterable[str] = (),
) -> Plan:
    """Plan producing our state dict from a foreign one; raises KeyMismatchError listing missing/unknown keys.

    `dropped_blocks` are foreign block prefixes deliberately left out (e.g. source layers a retrofit skips); keys
    under them are accepted only if the table knows their suffix. `generated` are our keys the caller creates
    (e.g. a new adapter); they are left out of the plan.
    """
    foreign = set(foreign_keys)
    ignored = [re.compile(p) for p in table.ignored]
    if config.tie_word_embeddings and OUR_HEAD in table.globals:
        ignored.append(re.compile(re.escape(table.globals[OUR_HEAD]) + "$"))
    plan: Plan = {}
    missing: list[str] = []
    used: set[str] = set()
    skip = set(generated)
    ours_keys = [k for k in expected_state(config) if k not in skip]
    for ours, theirs in table.pairs(ours_keys, blocks).items():
        sources = theirs.keys if isinstance(theirs, Fused) else (theirs,)
        absent = [s for s in sources if s not in foreign]
        if absent:
            missing.extend(absent)
            continue
        used.update(sources)
        plan[ours] = Step(sources, stack_rows if isinstance(theirs, Fused) else identity)
    suffixes = table.foreign_suffixes()
    dropped = tuple(dropped_blocks)

    def known(key: str) -> bool:
        if key in used or any(p.match(key) for p in ignored):
            return True
        return any(key.startswith(d) and key[len(d) :] in suffixes for d in dropped)

    unknown = [k for k in foreign if not known(k)]
    if missing or unknown:
        raise KeyMismatchError(f"{table.name} -> recurrent_depth", missing, unknown)
    return plan


def export_plan(
    table: KeyTable, our_keys: Iterable[str], config: RecurrentDepthConfig, blocks: Mapping[str, str]
) -> Plan:
    """Plan producing the foreign state dict from ours (the inverse of `import_plan` over the same table).

    A tied head in `our_keys` (as in `model.state_dict()`) is the embedding and is not exported on its own.
    """
    ours = set(our_keys) - ({OUR_HEAD} if config.tie_word_embeddings else set())
    expected = set(expected_state(config))
    if ours != expected:
        raise KeyMismatchError(f"recurrent_depth -> {table.name}", expected - ours, ours - expected)
    plan: Plan = {}
    for key, theirs in table.pairs(sorted(expected), blocks).items():
        if isinstance(theirs, Fused):
            sizes = theirs.sizes(config)
            for i, part in enumerate(theirs.keys):
                plan[part] = Step((key,), split_rows(sizes, i))
        else:
            plan[theirs] = Step((key,), identity)
    return plan


def run_step(step: Step, get: Callable[[str], torch.Tensor], like: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Compute one step; `get` loads an input tensor, `like(key)` is a tensor with the dtype and device of one."""
    if step.sources:
        return step.fn(*(get(k) for k in step.sources))
    reference = like(step.like) if step.like is not None else torch.empty(0)
    return step.fn(dtype=reference.dtype, device=reference.device)


def iter_plan(plan: Plan, state_dict: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Output tensors one at a time, in plan order (each input is loaded when needed)."""
    for key, step in plan.items():
        yield key, run_step(step, state_dict.__getitem__, like_getter(state_dict))


def apply_plan(plan: Plan, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(iter_plan(plan, state_dict))


def plan_specs(plan: Plan, specs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Output shapes and dtypes as meta tensors, from the inputs' meta tensors (no data is read)."""
    return apply_plan(plan, specs)


def check_shapes(what: str, got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Raise a ValueError listing every tensor whose shape differs from the model's for this config."""
    wrong = [
        f"{k}: {tuple(got[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in got and tuple(got[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise ValueError(f"{what}: tensor shapes do not match the config:\n  " + "\n  ".join(wrong))


def like_getter(state_dict: Mapping[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """`like(key)`: an empty tensor with the dtype and device of `state_dict[key]`, loading nothing if it is lazy."""
    spec = getattr(state_dict, "spec", None)
    if spec is None:
        return lambda key: state_dict[key].new_empty(0)
    return lambda key: torch.empty(0, dtype=spec(key).dtype)
