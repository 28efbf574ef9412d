"""Preallocated KV cache for recurrent-depth models: the path for `torch.compile`.

`StaticRecurrentCache` preallocates every slot of a `RecurrentCache` for a maximum length, batch size and number of
steps and writes by index, so a decode step has fixed shapes and no data-dependent Python. Slot bookkeeping
(`RecurrentCache.slot`) and the "latest step" rule are the dynamic cache's; only storage differs.

This file travels as remote code with every saved model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .cache_recurrent_depth import CORE, RecurrentCache, check_cache_batch, check_cache_count, kept_length


class StaticRecurrentSlot(CacheLayerMixin):
    """One slot of a `StaticRecurrentCache`: preallocated keys and values (B, kv_heads, max_cache_len, head_dim).

    Each slot owns its tensors (not views of one buffer), so a compiled in-place write touches only them.
    """

    is_compileable = True
    is_croppable = True
    is_sliding = False
    keys: torch.Tensor  # allocated in __init__ and never dropped (reset zeroes them)
    values: torch.Tensor

    def __init__(self, cache: StaticRecurrentCache, shape: tuple[int, ...], dtype: torch.dtype, device):
        super().__init__()
        self.cache, self.max_cache_len = cache, shape[-2]
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.device, self.is_initialized = self.keys.device, True
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the tensors are allocated with the cache."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Plain Transformers-style write at the cache's current length (code that treats the slot as a StaticLayer);
        the length itself advances once per forward, in `StaticRecurrentCache.record`."""
        positions = torch.arange(key_states.shape[-2], device=self.keys.device) + self.cache.cumulative_length
        self.keys.index_copy_(2, positions, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, positions, value_states.to(self.values.dtype))
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    # A tensor, not an int: compiled decode steps read the length without a graph break or recompilation.
    def get_seq_length(self) -> torch.Tensor:  # type: ignore[override]
        return self.cache.cumulative_length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def crop(self, tokens_to_remove: int) -> None:
        """The cache crops its length as a whole."""

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each row (new tensors: a compiled decode step recompiles once)."""
        self.keys, self.values = self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, 0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep these rows (new tensors: a compiled decode step recompiles once)."""
        indices = indices.to(self.keys.device)
        self.keys, self.values = self.keys.index_select(0, indices), self.values.index_select(0, indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Permute the rows in place: the tensors keep their addresses."""
        for tensor in (self.keys, self.values):
            tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class StaticRecurrentCache(RecurrentCache):
    """A `RecurrentCache` whose slots are preallocated tensors written by index, for `torch.compile`.

    Sized at construction for `max_cache_len` positions, `batch_size` rows and the core slots that `num_steps`
    recurrence steps (or `core_slots` shared slots) need; `generate(..., cache_implementation="static")` builds one.
    Attention reads a slot's whole tensors and the causal mask hides positions not written yet (`get_mask_sizes` is
    the full length, as for Transformers' StaticCache), so shapes never change while decoding.

    The length is a tensor and nothing in a decode step branches on data. A forward that runs fewer steps than the
    cache holds copies its last step into the remaining core slots at its positions, the eager form of
    `RecurrentCache`'s "latest" lookup, so a later call may run more steps (up to `num_steps`).
    """

    # Cache's `layers` narrowed to this cache's own slots, which are not RecurrentSlots; `steps` is never None here.
    layers: list[StaticRecurrentSlot]  # type: ignore[assignment]
    steps: torch.Tensor

    def __init__(
        self,
        config: Any,
        max_cache_len: int,
        batch_size: int = 1,
        num_steps: int | None = None,
        core_slots: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__(config, core_slots)
        check_cache_count("max_cache_len", max_cache_len, 1)
        check_cache_count("batch_size", batch_size, 1)
        num_steps = config.mean_recurrence if num_steps is None else num_steps
        self.max_steps = check_cache_count("num_steps (the most steps a call will run)", num_steps, 1)
        self.max_cache_len = max_cache_len
        self.core_steps_held = self.held_steps(num_steps, core_slots)  # per core layer
        n_slots = self.slot_count(config, num_steps, core_slots)
        shape = (batch_size, self.kv_shape[0], max_cache_len, self.kv_shape[1])
        self.layers = [StaticRecurrentSlot(self, shape, dtype, device) for _ in range(n_slots)]
        self.cumulative_length = torch.zeros((), dtype=torch.long, device=device)
        self.steps = torch.zeros((batch_size, max_cache_len), dtype=torch.long, device=device)
        self._top_step = -1  # highest core step written by the forward in progress
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.cumulative_length)
            torch._dynamo.mark_static_address(self.steps)

    def update_block(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        phase: str,
        layer: int,
        step: int,
        start: torch.Tensor | int,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, kv_heads, T, hd) at positions [start, start + T) of the slot; return the whole slot
        (B, kv_heads, max_cache_len, hd). With `rows`, the other rows keep their previous step's states here."""
        if phase == CORE:
            self._top_step = max(self._top_step, step)
        length = key_states.shape[-2]
        target = self.layers[self.slot(phase, layer, step)]
        keys, values = target.keys, target.values
        if rows is None:
            positions = torch.arange(length, device=keys.device) + start
            keys.index_copy_(2, positions, key_states.to(keys.dtype))
            values.index_copy_(2, positions, value_states.to(values.dtype))
            return keys, values
        # Adaptive exit (eager only): rows that skip this step keep their latest computed step at these positions.
        span = slice(int(start), int(start) + length)
        previous = self.layers[self.slot(CORE, layer, step - 1)] if phase == CORE and step > 0 else target
        if previous is not target:
            keys[:, :, span], values[:, :, span] = previous.keys[:, :, span], previous.values[:, :, span]
        keys[rows, :, span] = key_states.to(keys.dtype)
        values[rows, :, span] = value_states.to(values.dtype)
        return keys[rows], values[rows]

    def record(
        self, start: torch.Tensor | int, steps_used: torch.Tensor, length: int, last_latent: torch.Tensor
    ) -> None:
        """End of a forward: fill the core slots of steps it did not run, note its steps, advance the length."""
        positions = torch.arange(length, device=self.steps.device) + start
        for step in range(self._top_step + 1, self.core_steps_held):
            for layer in range(self.n_core):
                target = self.layers[self.slot(CORE, layer, step)]
                source = self.layers[self.slot(CORE, layer, step - 1)]
                target.keys.index_copy_(2, positions, source.keys.index_select(2, positions))
                target.values.index_copy_(2, positions, source.values.index_select(2, positions))
        self._top_step = -1
        if self.prompt_length == 0:
            self.prompt_length = length
        self.steps.index_copy_(1, positions, steps_used[:, None].expand(-1, length).to(self.steps.dtype))
        self.cumulative_length.add_(length)
        self.last_latent = last_latent

    def check_room(self, length: int, num_steps: int, batch: int) -> None:
        check_cache_batch(self.steps.shape[0], batch)
        if num_steps > self.max_steps:
            raise ValueError(
                f"this StaticRecurrentCache holds {self.max_steps} recurrence steps; a call ran more (num_steps > "
                f"{self.max_steps}). Build it with a larger num_steps"
            )
        if not torch.compiler.is_compiling() and int(self.cumulative_length) + length > self.max_cache_len:
            raise ValueError(
                f"this StaticRecurrentCache holds {self.max_cache_len} positions; writing {length} at "
                f"{int(self.cumulative_length)} overflows it (build it with a larger max_cache_len)"
            )

    # Tensors, not ints (like Transformers' StaticLayer): a compiled decode step must not specialize on the length.
    def get_seq_length(self, layer_idx: int = 0) -> torch.Tensor:  # type: ignore[override]
        return self.cumulative_length

    def get_query_offset(self, layer_idx: int = 0) -> torch.Tensor:  # type: ignore[override]
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_cache_len

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` positions (a positive value is the length to keep); tensors stay."""
        current = int(self.cumulative_length)
        keep = kept_length(tokens_to_remove, current)
        if keep < current:
            self.last_latent = None
        if keep == 0:
            self.prompt_length = 0
        self.cumulative_length.fill_(keep)

    def reset(self) -> None:
        Cache.reset(self)  # every slot zeroes its tensors (RecurrentCache.reset would drop `steps`)
        self.cumulative_length.zero_()
        self.steps.zero_()
        self.last_latent, self.prompt_length, self._top_step = None, 0, -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: permute the rows in place (the tensors keep their addresses)."""
        for slot in self.layers:
            slot.reorder_cache(beam_idx)
        self.steps.copy_(self.steps.index_select(0, beam_idx.to(self.steps.device)))
        if self.last_latent is not None:
            self.last_latent = self.last_latent.index_select(0, beam_idx.to(self.last_latent.device))

    def nbytes(self) -> int:
        """Bytes allocated for keys and values (the whole preallocated tensors)."""
        return sum(slot.nbytes() for slot in self.layers)

    @property
    def num_core_slots(self) -> int:
        return self.core_steps_held


__all__ = ["StaticRecurrentCache", "StaticRecurrentSlot"]
