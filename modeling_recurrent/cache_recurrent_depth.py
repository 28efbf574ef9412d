"""KV cache for recurrent-depth models.

Every (prelude layer | core step and layer | coda layer) writes its keys and values to a *slot*; `RecurrentCache.slot`
is the one function that owns that mapping. Each slot stores contiguous tensors of shape (B, kv_heads, capacity,
head_dim) that grow by doubling, so appending a token is amortized O(1) and nothing is re-stacked.

Sharing across recurrence steps trades memory for quality: `core_slots=N` keeps N slots per core layer, reused
modulo N (the reference's "compress-sN"); `core_slots=1` keeps only the latest step. When a token ran fewer steps
than a later token (different `num_steps` per call, or adaptive exit), the steps it never computed are filled with
its latest computed step of the same core layer (the reference's "latest" lookup, for any core size).

Its preallocated form for `torch.compile`, `StaticRecurrentCache`, is in static_cache_recurrent_depth.py.

This file travels as remote code with every saved model.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

PRELUDE, CORE, CODA = "prelude", "core", "coda"


def check_cache_count(name: str, value: object, minimum: int) -> int:
    """`value` if it is an int (not a bool) >= `minimum`; else a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_cache_batch(held: int, given: int) -> None:
    """Raise a ValueError naming both sizes if an input's batch size `given` differs from the cache's `held`."""
    if held != given:
        raise ValueError(
            f"this cache holds batch size {held} but the input has batch size {given}; "
            "use a new cache (or batch_select_indices / batch_repeat_interleave)"
        )


def kept_length(tokens_to_remove: int, length: int) -> int:
    """The length a cache of `length` positions keeps after `crop(tokens_to_remove)`: Transformers passes a negative
    count to drop, a positive value is read as the length to keep."""
    keep = tokens_to_remove if tokens_to_remove > 0 else length + tokens_to_remove
    return min(max(keep, 0), length)


class RecurrentSlot(CacheLayerMixin):
    """Keys and values of one slot: tensors (B, kv_heads, capacity, head_dim) of which `length` positions are used.

    `keys` and `values` are None until the first write and after `reset` (so `is_initialized` is False exactly then);
    code that runs only on a written slot casts them to tensors.
    """

    is_croppable = True
    is_sliding = False

    def __init__(self, reserve: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.length = 0
        self.reserve = reserve  # positions to allocate at the first growth (e.g. generate's maximum length)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.is_initialized = True

    def _reserve(self, needed: int) -> None:
        capacity = cast(torch.Tensor, self.keys).shape[-2]
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity, 16, self.reserve)
        for name in ("keys", "values"):
            old = getattr(self, name)
            grown = old.new_empty((*old.shape[:2], new_capacity, old.shape[-1]))
            grown[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, grown)

    def write(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        start: int,
        fill_from: RecurrentSlot | None = None,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write positions [start, start + T) and return all keys/values up to there (B, kv_heads, start + T, hd).

        Positions before `start` this slot never saw are copied from `fill_from` (the same layer's previous step).
        With `rows`, only those batch rows get new states; the others keep their previous step's states.
        """
        if not self.is_initialized:
            template = fill_from if rows is not None and fill_from is not None else None
            if template is not None:  # the same layer's previous step, written before this one
                self.lazy_initialization(cast(torch.Tensor, template.keys), cast(torch.Tensor, template.values))
            else:
                self.lazy_initialization(key_states, value_states)
        end = start + key_states.shape[-2]
        self._reserve(end)
        keys, values = cast(torch.Tensor, self.keys), cast(torch.Tensor, self.values)
        # Positions this slot lacks: earlier tokens that ran fewer steps, and with `rows` the current positions of
        # the rows that skip this step. They take the same layer's previous step, i.e. their latest computed one.
        gap_end = end if rows is not None else start
        if self.length < gap_end:
            if fill_from is None or fill_from.length < gap_end:
                raise RuntimeError("recurrent cache: a step lacks states that no earlier step of its layer computed")
            # fill_from.length > 0, so it has been written
            keys[:, :, self.length : gap_end] = cast(torch.Tensor, fill_from.keys)[:, :, self.length : gap_end]
            values[:, :, self.length : gap_end] = cast(torch.Tensor, fill_from.values)[:, :, self.length : gap_end]
        self.length = max(self.length, end)
        if rows is None:
            keys[:, :, start:end] = key_states
            values[:, :, start:end] = value_states
            return keys[:, :, :end], values[:, :, :end]
        keys[rows, :, start:end] = key_states
        values[rows, :, start:end] = value_states
        return keys[rows, :, :end], values[rows, :, :end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Plain Transformers-style append (used by code that treats the slot as a DynamicLayer)."""
        return self.write(key_states, value_states, self.length)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self.length = max(self.length + tokens_to_remove, 0)

    def _map_batch(self, fn) -> None:
        if self.is_initialized:
            self.keys = fn(cast(torch.Tensor, self.keys)[:, :, : self.length])
            self.values = fn(cast(torch.Tensor, self.values)[:, :, : self.length])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def nbytes(self) -> int:
        """Bytes of the used part of this slot (keys and values)."""
        if not self.is_initialized:
            return 0
        keys, values = cast(torch.Tensor, self.keys), cast(torch.Tensor, self.values)
        per_position = keys[:, :, :1].numel() * keys.element_size()
        per_position += values[:, :, :1].numel() * values.element_size()
        return per_position * self.length


class RecurrentCache(Cache):
    """Transformers `Cache` for prelude / iterated core / coda, with optional sharing of core slots across steps.

    Args:
        config: the model config (gives the number of prelude, core and coda blocks).
        core_slots: None keeps one slot per recurrence step and core layer (exact). N >= 1 keeps N slots per core
            layer, reused modulo N (N=1: only the latest step), cutting memory at some cost in quality.
        reserve: positions each slot allocates when it is first written (generate passes its maximum length, so
            slots never grow while decoding); 0 grows by doubling from the first write.
    """

    # Cache types `layers` as a list of any layer kind; this cache holds only its own slots (list is invariant).
    layers: list[RecurrentSlot]  # type: ignore[assignment]

    def __init__(self, config: Any, core_slots: int | None = None, reserve: int = 0):
        if core_slots is not None:
            check_cache_count("core_slots (None: one slot per step)", core_slots, 1)
        super().__init__(layers=[])
        self.n_prelude, self.n_core, self.n_coda = config.n_prelude, config.n_core, config.n_coda
        self.kv_shape = (config.num_kv_heads, config.attention_head_dim)
        self.core_slots = core_slots
        self.reserve = check_cache_count("reserve (positions)", reserve, 0)
        self._seq_length = 0
        self.steps: torch.Tensor | None = None  # (B, L) recurrence steps each cached token ran
        self.prompt_length = 0  # tokens of the first forward (the prompt, in generate)
        self.last_latent: torch.Tensor | None = None  # (B, 1, D) final latent of the last position (warm start)

    def record(
        self, start: int | torch.Tensor, steps_used: torch.Tensor, length: int, last_latent: torch.Tensor
    ) -> None:
        """Note the steps (B,) run by the `length` tokens written at `start`, and the last position's latent."""
        start = int(start)  # the model's start position is a tensor only with a StaticRecurrentCache
        new = steps_used[:, None].expand(-1, length)
        if start == 0:
            self.prompt_length = length
        self.steps = new.clone() if self.steps is None else torch.cat([self.steps[:, :start], new], dim=1)
        self.last_latent = last_latent

    def slot(self, phase: str, layer: int, step: int = 0) -> int:
        """The cache slot of block `layer` of `phase` ("prelude", "core", "coda") at recurrence `step`."""
        if phase == PRELUDE:
            return layer
        if phase == CODA:
            return self.n_prelude + layer
        if phase != CORE:
            raise ValueError(f"unknown phase {phase!r}; expected one of {(PRELUDE, CORE, CODA)}")
        shared_step = step if self.core_slots is None else step % self.core_slots
        return self.n_prelude + self.n_coda + shared_step * self.n_core + layer

    def update_block(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        phase: str,
        layer: int,
        step: int,
        start: int | torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, kv_heads, T, hd) states of one block at positions [start, start + T); return all up to there.

        `rows` (1-D long tensor) restricts the write to those batch rows (adaptive exit); the states given then have
        len(rows) rows, and so do the returned ones.
        """
        start = int(start)  # the model's start position is a tensor only with a StaticRecurrentCache
        index = self.slot(phase, layer, step)
        while len(self.layers) <= index:
            self.layers.append(RecurrentSlot(reserve=self.reserve))
        target = self.layers[index]
        fill_from = self.layers[self.slot(CORE, layer, step - 1)] if phase == CORE and step > 0 else None
        keys, values = target.write(key_states, value_states, start, fill_from, rows)
        self._seq_length = max(self._seq_length, start + key_states.shape[-2])
        return keys, values

    def check_room(self, length: int, num_steps: int, batch: int) -> None:
        """Raise a ValueError, once per forward and before anything is written, if `batch` rows of `length` more
        positions run for up to `num_steps` steps do not fit. A growing cache only checks the batch size."""
        if self.layers and self.layers[0].is_initialized:
            check_cache_batch(cast(torch.Tensor, self.layers[0].keys).shape[0], batch)

    def check_compatible(self, config: Any) -> None:
        """Raise a ValueError if this cache was built for a model of another shape."""
        theirs = (config.n_prelude, config.n_core, config.n_coda, config.num_kv_heads, config.attention_head_dim)
        ours = (self.n_prelude, self.n_core, self.n_coda, *self.kv_shape)
        if theirs != ours:
            raise ValueError(
                f"past_key_values was built for blocks/kv-heads/head_dim {ours}, but this model has {theirs}"
            )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seq_length

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._seq_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._seq_length + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` positions (a positive value is read as the length to keep)."""
        keep = kept_length(tokens_to_remove, self._seq_length)
        for slot in self.layers:  # slots of steps some tokens skipped are shorter: never grow them here
            slot.length = min(slot.length, keep)
        if self.steps is not None:
            self.steps = self.steps[:, :keep]
        if keep < self._seq_length:
            self.last_latent = None  # it belonged to a dropped position
        self._seq_length = keep

    def reset(self) -> None:
        super().reset()
        self._seq_length = 0
        self.steps = self.last_latent = None

    def _map_batch(self, fn) -> None:
        if self.steps is not None:
            self.steps = fn(self.steps)
        if self.last_latent is not None:
            self.last_latent = fn(self.last_latent)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_batch(lambda t: t[indices])

    def nbytes(self) -> int:
        """Bytes held by the used part of every slot (keys and values)."""
        return sum(slot.nbytes() for slot in self.layers)

    @property
    def num_core_slots(self) -> int:
        """How many slots per core layer are allocated now."""
        return max(len(self.layers) - self.n_prelude - self.n_coda, 0) // self.n_core

    @staticmethod
    def held_steps(num_steps: int, core_slots: int | None) -> int:
        """Core steps a cache keeps per core layer: every step, or `core_slots` shared ones."""
        return num_steps if core_slots is None else min(core_slots, num_steps)

    @staticmethod
    def slot_count(config: Any, num_steps: int, core_slots: int | None = None) -> int:
        """Slots (one per block application kept) after a forward of `num_steps` steps."""
        return config.n_prelude + config.n_coda + config.n_core * RecurrentCache.held_steps(num_steps, core_slots)

    @staticmethod
    def estimate_bytes(
        config: Any,
        batch: int,
        length: int,
        num_steps: int,
        core_slots: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> int:
        """Bytes of keys and values held for `batch` rows of `length` positions run with `num_steps` steps:
        (prelude + coda + core x held steps) slots x 2 (k, v) x batch x kv_heads x head_dim x length x dtype size, where
        held steps = num_steps, or min(core_slots, num_steps) with shared slots. A `StaticRecurrentCache`, or a
        `RecurrentCache` with reserve=length, allocates exactly this; one growing by doubling up to twice as much."""
        slots = RecurrentCache.slot_count(config, num_steps, core_slots)
        return slots * 2 * batch * config.num_kv_heads * config.attention_head_dim * length * dtype.itemsize

    @staticmethod
    def available_bytes(device: torch.device) -> int | None:
        """Memory free for a cache on `device` (CPU: psutil's `available`), or None when it cannot be told."""
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type != "cpu":
            return None
        try:
            import psutil
        except ImportError:  # not a dependency of remote code
            return None
        return psutil.virtual_memory().available


def one_cache(past_key_values: RecurrentCache | None, cache: RecurrentCache | None) -> RecurrentCache | None:
    """`past_key_values` and `cache` (its name in newer Transformers releases) are the same argument."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the cache as either past_key_values or cache, not both")
    return past_key_values if past_key_values is not None else cache


__all__ = [
    "CODA",
    "CORE",
    "PRELUDE",
    "RecurrentCache",
    "RecurrentSlot",
    "kept_length",
    "one_cache",
]
