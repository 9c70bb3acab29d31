"""The storage of one layer of a ``HeadSparseCache`` (csrc/kvcache/kv_layout.h): its layout
tables, made from the layer's kinds, windows and sinks, and its storages, allocated once the
batch size, dtype and device are known (the cache's first call, or its construction)."""

from __future__ import annotations

import torch

KINDS = ("full", "streaming", "budget")
FULL, STREAMING, BUDGET = range(3)
_GROWTH_ALIGN = 64


class LayerStorage:
    """Layout tables and storages of one layer.

    ``lengths`` (a tensor the kernels read) and ``held`` (the same numbers as a Python list) are
    the tokens each batch row holds: decisions on the host read ``held``, so a decode step reads
    no tensor data (torch.compile traces it without a graph break).
    """

    def __init__(self, caller, kinds, windows, sinks, group, D, max_step, budgets, recent, compensation=None,
                 append_room=0, model_window=None):
        self.kinds = [KINDS.index(k) for k in kinds]
        self.model_window = model_window  # the model's own window in a sliding-window layer (None: none)
        compensation = compensation or [None] * len(kinds)
        for h, (kind, comp) in enumerate(zip(kinds, compensation)):
            if comp is not None and kind != "streaming":
                raise ValueError(f"{caller}: compensation must be None for KV head {h}, a {kind} head, got {comp!r} "
                                 "(only streaming KV heads evict tokens to compensate for)")
        self.compensation = list(compensation)
        self.Hkv, self.D = len(kinds), D
        self.has_partial_heads = any(k != FULL for k in self.kinds)  # streaming or budget KV heads
        # query heads whose KV head keeps only part of the keys (no full branch for alpha)
        self.partial_query_heads = [h for h in range(self.Hkv * group) if self.kinds[h // group] != FULL]
        index, full, ring_sinks, ring_capacity, budget_rows, comp_rows = [], 0, [], [], [], []
        for h, kind in enumerate(kinds):
            if kind == "full":
                index.append(full)
                full += 1
                continue
            served = range(h * group, (h + 1) * group)
            w = [windows[q] for q in served]
            if kind == "budget":
                if any(x >= 0 for x in w):
                    raise ValueError(f"{caller}: KV head {h} is a budget head but query head(s) "
                                     f"{[q for q in served if windows[q] >= 0]} have a window: a budget head's "
                                     "query heads see every kept token (window must be < 0)")
                kept_sinks = max(sinks[q] for q in served)
                n = budgets[h]
                if n is None or n < kept_sinks + recent + 1:
                    raise ValueError(f"{caller}: budget must be set for budget KV head {h} and > its sinks "
                                     f"({kept_sinks}) + budget_recent ({recent}), got {n} (for a HeadKV spec, "
                                     f"HeadSpec.headkv(..., window={recent}) keeps every head above it)")
                # its slots: what the prefill selection keeps plus the room appends fill before any eviction
                budget_rows.append([0, n + append_room, kept_sinks, recent])  # offsets filled in below
                index.append(len(budget_rows) - 1)
                continue
            if any(x < 1 for x in w):
                raise ValueError(f"{caller}: KV head {h} is streaming but query head(s) "
                                 f"{[q for q in served if windows[q] < 1]} have window < 1 (unlimited or 0): a "
                                 "streaming head keeps sinks + a window of recent tokens, window must be >= 1")
            index.append(len(ring_sinks))
            comp_rows.append([-1, 0] if compensation[h] is None else
                             [sum(r[0] >= 0 for r in comp_rows), int(compensation[h] == "weighted")])
            ring_sinks.append(max(sinks[q] for q in served))
            ring_capacity.append(max(w) + max_step - 1)
        self.full_heads = full
        # a streaming head's ring holds up to ring_capacity[s] tokens; it grows with the tokens it
        # receives (reserve), so the storage holds what the head has seen, not its capacity ahead
        self.ring_capacity, self.ring_sink_counts = ring_capacity, ring_sinks
        self.slots = sum(ring_sinks) + sum(ring_capacity) + sum(row[1] for row in budget_rows)  # at capacity
        self.check_slots(caller, 1, "")
        self.kv_kind = torch.tensor(self.kinds, dtype=torch.int64)
        self.kv_index = torch.tensor(index, dtype=torch.int64)
        self.ring_sinks = torch.tensor(ring_sinks, dtype=torch.int64)
        # budget heads' [offset, size, sinks, recent], [Hb, 4]; budget_table, the kernels' [B, Hb, 4]
        # copy (each row's sizes may change at prefill), exists once the storages are allocated
        self.budget_layout = torch.tensor(budget_rows, dtype=torch.int64).reshape(-1, 4) if budget_rows else None
        self.budget_table = None
        self.budgets = [row[1] for row in budget_rows]  # slots per budget head
        self.append_room = append_room
        self._lay_out_rings([min(1, c) for c in ring_capacity])
        # compensated streaming heads (RazorAttention): [Hs, 2] rows [index or -1, weighted]
        # (kv_layout.h); their storages, float64 sums [B, Hc, D] and counts [B, Hc], once allocated
        self.comp_heads = sum(r[0] >= 0 for r in comp_rows)
        self.comp_table = torch.tensor(comp_rows, dtype=torch.int64).reshape(-1, 2) if self.comp_heads else None
        self.comp_k = self.comp_v = self.comp_n = None
        self.windows = torch.tensor(windows, dtype=torch.int64)
        self.window_list = [int(w) for w in windows]  # (the host's copy: windows moves to the device)
        self.sinks = torch.tensor(sinks, dtype=torch.int64)
        self.held: list[int] = []  # per batch row; empty until allocated
        # per batch row: the most it has held since it was empty (a crop leaves the rings' slots of the
        # dropped tokens written, and what they overwrote gone)
        self.written: list[int] = []
        # per batch row: the left padding of its prompt (not stored; transformers counts it in the sequence)
        self.pads: list[int] = []
        # the last call stored a prompt (cache.attention's prefill): the layers that read this storage
        # (Gemma's num_kv_shared_layers) attend over that prompt as given, not over what is kept
        self.prompt_just_stored = False
        self.lengths = torch.zeros(0, dtype=torch.int64)
        self.full_k, self.full_v = [], []  # segments [B, Hf, n, D]
        self.full_capacity = 0  # tokens the segments hold, summed
        self.ring_k = self.ring_v = self.slot_pos = self.slot_mass = None
        self._scratch_mass = None  # (budget_args(scored=False))

    def _lay_out_rings(self, sizes) -> None:
        """The streaming storage's layout for rings of `sizes` slots: each streaming head's sinks
        and ring, then the budget heads' slots (ring_offset, ring_size, the budget offsets, slots)."""
        offsets, offset = [], 0
        for sinks, size in zip(self.ring_sink_counts, sizes):
            offsets.append(offset)
            offset += sinks + size
        device = self.ring_sinks.device
        self.ring_offset = torch.tensor(offsets, dtype=torch.int64, device=device)
        self.ring_size = torch.tensor(sizes, dtype=torch.int64, device=device)
        self.ring_alloc, self.ring_offsets, self.budget_start = list(sizes), offsets, offset  # (Python mirrors)
        if self.budget_layout is not None:
            self.budget_layout[:, 0] = offset + torch.cumsum(self.budget_layout[:, 1], 0) - self.budget_layout[:, 1]
        self.slots_held = offset + sum(self.budgets)

    def _grow_rings(self, tokens: int) -> None:
        """Rings large enough for rows of `tokens` tokens: each grows, before it would evict, to
        what it must hold (at most its capacity), rounded up to 64 slots and by at least 1/64; the
        streaming storage is reallocated and what it holds moved (a ring that has not reached its
        capacity has never wrapped: its slots keep their places)."""
        grown = []
        for sinks, cap, size in zip(self.ring_sink_counts, self.ring_capacity, self.ring_alloc):
            need = min(cap, max(tokens - sinks, 1))
            grown.append(size if need <= size else min(cap, -(-max(need, size + size // 64) // 64) * 64))
        if grown == self.ring_alloc:
            return
        old_offsets, old_sizes, old_start = self.ring_offsets, self.ring_alloc, self.budget_start
        self._lay_out_rings(grown)
        if self.ring_k is None:  # not allocated yet
            return
        B, dtype, device = self._storage
        moves = [(o, n, s + size) for o, n, s, size in zip(old_offsets, self.ring_offsets, self.ring_sink_counts,
                                                             old_sizes)]
        delta = self.budget_start - old_start
        moves.append((old_start, self.budget_start, sum(self.budgets)))
        for name in ("ring_k", "ring_v"):
            old = getattr(self, name)
            new = torch.zeros(B, self.slots_held, self.D, dtype=dtype, device=device)
            for o, n, count in moves:
                new[:, n:n + count] = old[:, o:o + count]
            setattr(self, name, new)
        if self.budget_table is not None:
            for name, fill in (("slot_pos", -1), ("slot_mass", 0)):
                old = getattr(self, name)
                new = torch.full((B, self.slots_held), fill, dtype=old.dtype, device=device)
                new[:, self.budget_start:] = old[:, old_start:]
                setattr(self, name, new)
            self.budget_table[:, :, 0] += delta

    def check_slots(self, caller, B, dtype) -> None:
        if self.slots * B * self.D >= 2**62:  # (past what int64 sizes, or any memory, can hold)
            raise self._too_big(caller, B, dtype)

    def _too_big(self, caller, B, dtype) -> ValueError:
        return ValueError(f"{caller}: window, sinks, budget and max_step must be small enough to allocate the "
                          f"streaming and budget heads' storage, got {self.slots} slots of [{B}, {self.D}]"
                          f"{f' {dtype}' if dtype else ''} per layer")

    # ------------------------------------------------------------------------------ allocation

    def allocate(self, caller, B, dtype, device) -> None:
        """The storages for B rows of `dtype` on `device`, each row empty."""
        self.check_slots(caller, B, dtype)
        try:
            self.ring_k = torch.zeros(B, self.slots_held, self.D, dtype=dtype, device=device)
            self.ring_v = torch.zeros(B, self.slots_held, self.D, dtype=dtype, device=device)
        except (RuntimeError, MemoryError):
            self.ring_k = self.ring_v = None
            raise self._too_big(caller, B, dtype) from None
        self._storage = (B, dtype, device)
        if self.comp_heads:
            self.comp_k = torch.zeros(B, self.comp_heads, self.D, dtype=torch.float64, device=device)
            self.comp_v = torch.zeros(B, self.comp_heads, self.D, dtype=torch.float64, device=device)
            self.comp_n = torch.zeros(B, self.comp_heads, dtype=torch.int64, device=device)
        for name in ("kv_kind", "kv_index", "ring_offset", "ring_sinks", "ring_size", "windows", "sinks",
                     "comp_table"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        self.lengths = torch.zeros(B, dtype=torch.int64, device=device)
        self.held = [0] * B
        self.written = [0] * B
        self.pads = [0] * B
        if self.budget_layout is not None:  # budget heads: each slot's position (-1 empty) and attention mass
            self.slot_pos = torch.full((B, self.slots_held), -1, dtype=torch.int64, device=device)
            self.slot_mass = torch.zeros(B, self.slots_held, dtype=torch.float32, device=device)
            # per row: a row's budget heads may share their slots differently (AdaKV)
            self.budget_table = self.budget_layout.to(device).unsqueeze(0).repeat(B, 1, 1).contiguous()

    def release(self) -> None:
        """Back to no storage (a first call that could not allocate every layer changes nothing)."""
        self.ring_k = self.ring_v = self.slot_pos = self.slot_mass = self.budget_table = None
        self._scratch_mass = None
        self.comp_k = self.comp_v = self.comp_n = None
        self.lengths = torch.zeros(0, dtype=torch.int64)
        self.held = []
        self.written = []
        self.pads = []

    _ROW_STORAGES = ("ring_k", "ring_v", "slot_pos", "slot_mass", "budget_table", "comp_k", "comp_v", "comp_n",
                     "lengths")

    def take_rows(self, index: torch.Tensor, rows: list) -> None:
        """Row i becomes what row rows[i] held (`index`: the same rows as an int64 tensor on the
        storages' device; rows may repeat or be left out). With as many rows as before the storages
        are rewritten in place and keep their addresses (a captured CUDA graph stays valid); else
        they are new, of len(rows) rows."""
        in_place = len(rows) == len(self.held)

        def take(t):
            if t is None:
                return None
            picked = t.index_select(0, index)
            return t.copy_(picked) if in_place else picked

        self.full_k = [take(seg) for seg in self.full_k]
        self.full_v = [take(seg) for seg in self.full_v]
        for name in self._ROW_STORAGES:
            setattr(self, name, take(getattr(self, name)))
        self.held = [self.held[b] for b in rows]
        self.written = [self.written[b] for b in rows]
        self.pads = [self.pads[b] for b in rows]
        B, dtype, device = self._storage
        self._storage = (len(rows), dtype, device)

    def why_not_dropped(self, n: int):
        """Why the last n tokens of every row cannot be dropped so that the layer holds what it would
        have held without them, or None: a budget head chose by the attention they gave and may have
        evicted for them; a ring that wrapped keeps the window's keys before them only while n <= its
        size - the window + 1 (max_step); a compensated head cannot unfold what they evicted."""
        for h, kind in enumerate(self.kinds):
            if kind == FULL:
                continue
            if kind == BUDGET:
                return f"KV head {h} is a budget head: the tokens it kept were chosen by the attention of the ones " \
                       "to drop"
            i = int(self.kv_index[h])
            sinks, ring = self.ring_sink_counts[i], self.ring_alloc[i]
            group = len(self.window_list) // self.Hkv
            window = max(self.window_list[h * group:(h + 1) * group])
            for L in self.held:
                # (the ring wrapped: the n overwrote the slots of the n keys before its oldest; the next
                # query, at the first of them, needs the window - 1 keys before it)
                if L > sinks + ring and n > ring - window + 1:
                    return f"KV head {h} streams (window {window}, ring {ring}): its ring no longer holds the window " \
                           f"before the last {n} tokens (a cache with max_step >= {n} keeps it)"
                if self.compensation[h] is not None and max(sinks, L - ring) > max(sinks, L - n - ring):
                    return f"KV head {h} is compensated: the tokens the last {n} evicted are folded into its sums"
        return None

    def drop_last(self, n: int) -> None:
        """Every row holds n tokens fewer (why_not_dropped said it can): what the slots past them hold
        is overwritten by the next appends (a wrapped ring's oldest n slots held tokens they
        overwrote: `written` keeps them out of the kept positions)."""
        self.lengths -= n
        self.held = [L - n for L in self.held]

    def forget_tokens(self) -> None:
        """Every row empty again, as just allocated; the storages keep their sizes and addresses."""
        self.lengths.zero_()
        self.held = [0] * len(self.held)
        self.written = [0] * len(self.written)
        self.pads = [0] * len(self.pads)
        self.prompt_just_stored = False
        if self.budget_table is not None:
            self.budget_table.copy_(self.budget_layout.to(self.budget_table.device).expand_as(self.budget_table))
            self.slot_pos.fill_(-1)
            self.slot_mass.zero_()
        for t in (self.comp_k, self.comp_v, self.comp_n):
            if t is not None:
                t.zero_()

    # ------------------------------------------------------------------------------ tokens

    def padded_length(self) -> int:
        """The sequence length as transformers counts it: tokens held plus the prompt's left padding
        (the same for every row of a left-padded batch)."""
        return max((n + p for n, p in zip(self.held, self.pads)), default=0)

    def capacity(self) -> int:
        """Tokens per row the full storage's segments hold."""
        return self.full_capacity

    def room(self):
        """Tokens a row can hold before the storages must grow: the full storage's capacity (with
        full heads) and sinks + slots of each ring not yet at its capacity (past that it would
        grow); None when nothing can grow."""
        limits = [self.full_capacity] if self.full_heads else []
        limits += [sinks + size for sinks, cap, size in zip(self.ring_sink_counts, self.ring_capacity, self.ring_alloc)
                   if size < cap]
        return min(limits) if limits else None

    def reserve(self, tokens: int) -> None:
        """Makes the storages hold rows of `tokens` tokens: the rings grow up to their capacity,
        the full storage gets one more segment where it needs one."""
        if self.ring_alloc != self.ring_capacity:
            self._grow_rings(tokens)
        cap = self.full_capacity
        if tokens <= cap or self.full_heads == 0:
            return
        n = max(tokens - cap, 64, cap // 64)  # (at most 1/64 more than held: nbytes within 2 % of ideal)
        n = -(-n // _GROWTH_ALIGN) * _GROWTH_ALIGN
        B, dtype, device = self._storage
        self.full_k.append(torch.empty(B, self.full_heads, n, self.D, dtype=dtype, device=device))
        self.full_v.append(torch.empty(B, self.full_heads, n, self.D, dtype=dtype, device=device))
        self.full_capacity += n

    def budget_args(self, rows=None, scored=True):
        """The budget heads' arguments of the ops, of every row or of `rows` (a slice). `scored`
        False: the attention mass a decode call adds goes to a scratch tensor, not to the masses
        eviction reads (the layers reading this storage: its own heads' attention decides)."""
        if self.budget_table is None:
            return None, None, None
        mass = self.slot_mass
        if not scored:
            if self._scratch_mass is None or self._scratch_mass.shape != mass.shape or \
                    self._scratch_mass.device != mass.device:
                self._scratch_mass = torch.zeros_like(mass)
            mass = self._scratch_mass
        if rows is None:
            return self.budget_table, self.slot_pos, mass
        return self.budget_table[rows], self.slot_pos[rows], mass[rows]

    def comp_args(self, rows=None):
        """The compensated heads' arguments of the ops, of every row or of `rows` (a slice)."""
        if self.comp_table is None:
            return None, None, None, None
        if rows is None:
            return self.comp_table, self.comp_k, self.comp_v, self.comp_n
        return self.comp_table, self.comp_k[rows], self.comp_v[rows], self.comp_n[rows]

    def compensation_of(self, b, h):
        """(mean key, mean value, count) of the tokens compensated streaming KV head h of row b has
        evicted (float64 [D], [D], int; the means are 0 while nothing was evicted)."""
        i = int(self.kv_index[h])
        c = int(self.comp_table[i, 0]) if self.kinds[h] == STREAMING and self.comp_table is not None else -1
        if c < 0:
            raise ValueError(f"KV head {h} is not a compensated streaming head")
        n = int(self.comp_n[b, c])
        return self.comp_k[b, c] / max(n, 1), self.comp_v[b, c] / max(n, 1), n

    def append(self, k, v, row=None, write_budget=True):
        """Stores k, v ([B, S, Hkv, D]; one row's [1, S, Hkv, D] with `row`) after what each row holds."""
        if row is None:  # (every row: the storages themselves, no views to make -- a decode step's case)
            full_k, full_v, ring_k, ring_v, lengths = self.full_k, self.full_v, self.ring_k, self.ring_v, self.lengths
            budget, comp = self.budget_args(), self.comp_args()
        else:
            rows = slice(row, row + 1)
            full_k, full_v = [seg[rows] for seg in self.full_k], [seg[rows] for seg in self.full_v]
            ring_k, ring_v, lengths = self.ring_k[rows], self.ring_v[rows], self.lengths[rows]
            budget, comp = self.budget_args(rows), self.comp_args(rows)
        torch.ops.headops.kv_append.default(k, v, full_k, full_v, ring_k, ring_v, lengths, self.kv_kind, self.kv_index,
                                            self.ring_offset, self.ring_sinks, self.ring_size, *budget, write_budget,
                                            *comp)
        n = k.shape[1]
        if row is None:
            self.lengths += n
            self.now_holds([x + n for x in self.held])
        else:
            self.lengths[row] += n
            self.now_holds([x + n if b == row else x for b, x in enumerate(self.held)])

    def now_holds(self, held: list) -> None:
        """The host's mirror of what each row holds after appends (or replayed ones): `held`, and the
        most each row has held (`written`)."""
        self.held = held
        self.written = [max(w, x) for w, x in zip(self.written, held)]

    def kept_positions(self, b, h):
        """Sorted original positions KV head h of row b holds (budget heads: the kept set)."""
        L = self.held[b]
        i = int(self.kv_index[h])
        if self.kinds[h] == FULL:
            return torch.arange(L)
        if self.kinds[h] == STREAMING:  # (the ring holds the last r positions written, those below L)
            s, r = int(self.ring_sinks[i]), int(self.ring_size[i])
            return torch.cat([torch.arange(min(s, L)), torch.arange(min(max(s, self.written[b] - r), L), L)])
        off, n = int(self.budget_table[b, i, 0]), int(self.budget_table[b, i, 1])
        pos = self.slot_pos[b, off:off + n]
        return pos[pos >= 0].sort().values

    def kept_kv(self, b, h):
        """(positions, k, v): what KV head h of row b holds, in position order ([n], [n, D], [n, D])."""
        positions = self.kept_positions(b, h).to(self.lengths.device)
        i = int(self.kv_index[h])
        if self.kinds[h] == FULL:
            if not self.full_k:  # (nothing stored in the layer yet)
                empty = self.ring_k.new_zeros(0, self.D)
                return positions, empty, empty.clone()
            k = torch.cat([seg[b, i] for seg in self.full_k], 0)[:positions.numel()]
            v = torch.cat([seg[b, i] for seg in self.full_v], 0)[:positions.numel()]
            return positions, k, v
        if self.kinds[h] == STREAMING:  # csrc/kvcache/kv_layout.h: RingLayout::slot_of
            sinks, ring = int(self.ring_sinks[i]), int(self.ring_size[i])
            slots = self.ring_offsets[i] + torch.where(positions < sinks, positions,
                                                       sinks + (positions - sinks) % max(ring, 1))
        else:
            off, n = int(self.budget_table[b, i, 0]), int(self.budget_table[b, i, 1])
            held = self.slot_pos[b, off:off + n]
            order = torch.argsort(torch.where(held >= 0, held, held.new_tensor(2**62)))[:positions.numel()]
            slots = off + order
        return positions, self.ring_k[b, slots], self.ring_v[b, slots]

    @property
    def selection_budgets(self) -> list:
        """What a prefill selection keeps per budget head; the rest of its slots stay free for appends."""
        return [n - self.append_room for n in self.budgets]

    def set_budget_sizes(self, b, sizes):
        """Row b's budget heads hold sizes[i] slots each from now on (their total is the layout's:
        AdaKV shares it differently per row); every budget slot of the row is emptied."""
        assert sum(sizes) == sum(self.budgets) and all(x > 0 for x in sizes)
        table = self.budget_table[b]
        start = self.budget_start
        offsets = torch.tensor(sizes, dtype=torch.int64).cumsum(0) - torch.tensor(sizes, dtype=torch.int64) + start
        table[:, 0] = offsets.to(table.device)
        table[:, 1] = torch.tensor(sizes, dtype=torch.int64, device=table.device)
        self.slot_pos[b, start:] = -1
        self.slot_mass[b, start:] = 0

    def budget_sizes(self, b) -> list:
        """The slots each budget head of row b holds."""
        return self.budget_table[b, :, 1].tolist()

    def write_budget_selection(self, b, i, positions, k_rows, v_rows, mass):
        """Budget head i of row b keeps exactly `positions` (with their K, V rows and mass)."""
        off, n = int(self.budget_table[b, i, 0]), int(self.budget_table[b, i, 1])
        m = positions.numel()
        self.slot_pos[b, off:off + n] = -1
        self.slot_mass[b, off:off + n] = 0
        self.slot_pos[b, off:off + m] = positions
        self.slot_mass[b, off:off + m] = mass.to(torch.float32)
        self.ring_k[b, off:off + m] = k_rows
        self.ring_v[b, off:off + m] = v_rows

    def kept_tokens(self) -> int:
        """Tokens a minimal storage would hold for this layer (all rows and KV heads)."""
        total = 0
        for b, L in enumerate(self.held):
            for h, kind in enumerate(self.kinds):
                i = int(self.kv_index[h])
                if kind == FULL:
                    total += L
                elif kind == STREAMING:  # (after a crop, fewer: kept_positions)
                    sinks = self.ring_sink_counts[i]
                    total += min(L, sinks) + max(0, L - max(sinks, self.written[b] - self.ring_capacity[i]))
                else:  # the slots it fills (fewer than min(L, size) while appends fill its room)
                    off, n = int(self.budget_table[b, i, 0]), int(self.budget_table[b, i, 1])
                    total += int((self.slot_pos[b, off:off + n] >= 0).sum())
        return total

    def compensation_tokens(self) -> int:
        """Compensation tokens in use: one per row and compensated head that has evicted a token."""
        total = 0
        for h, comp in enumerate(self.compensation):
            if comp is not None:
                i = int(self.kv_index[h])
                total += sum(L > self.ring_sink_counts[i] + self.ring_capacity[i] for L in self.held)
        return total

    def nbytes(self) -> int:
        tables = [self.kv_kind, self.kv_index, self.ring_offset, self.ring_sinks, self.ring_size, self.lengths]
        storages = self.full_k + self.full_v + [self.ring_k, self.ring_v]
        if self.budget_table is not None:
            storages += [self.budget_table, self.slot_pos, self.slot_mass]
        if self.comp_table is not None:
            storages += [self.comp_table, self.comp_k, self.comp_v, self.comp_n]
        return sum(t.numel() * t.element_size() for t in storages + tables if t is not None)
