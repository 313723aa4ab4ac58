"""LoRA for a batch of requests that use different adapters, in one pass through the base model.

PEFT loops over adapters inside every layer. Here each adapted `nn.Linear` holds every loaded
adapter's weights in slots (see `LoraLinear`; B pre-scaled by alpha / r), and a batch row names
its slot (0: no adapter). The LoRA delta of a mixed batch is then two batched matmuls (`bmm`):
the rows are grouped by slot, each group padded to the largest, and each group multiplies its own
slot's A and B, whatever the mix: the segment-by-adapter computation of Punica's SGMV and
S-LoRA, in plain PyTorch. Adapters of a smaller rank are zero-padded to the largest, which
changes nothing. When every row uses the same adapter, only its slot is used.

rsLoRA adapters differ only in their scale (alpha / sqrt(r)), folded into B like alpha / r.
DoRA adapters (PEFT's `use_dora`) are batched too: DoRA's layer is
W' = m * (W + s·BA) / ||W + s·BA||_row, so its output is g * (Wx + s·BAx) + bias with
g = m / ||W + s·BA||_row, one number per output feature. g depends only on the adapter and the
base weights, so it is computed once when the adapter enters its slot; a forward pass then
scales each row's output by its slot's g (1 for plain LoRA and for no adapter), as PEFT
computes it at inference: y + (g - 1)·(y - bias) + g·s·BAx.

While one adapter serves every running row, its LoRA math at every step costs about a fifth of
a decode step at batch size one on a CPU (five small operations in each of 210 layers). After
`MERGE_AFTER_STEPS` such steps, each layer keeps a merged copy of its weights for that adapter,
W + s·BA (for DoRA g·(W + s·BA)), and runs that copy alone: the base model's
speed. The base weights stay as they were, so a row without an adapter, or a mixed batch, never
waits for an unmerge; the copy is one more set of the adapted layers' weights in memory
(`Settings.merge_single_adapter` turns it off).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from app.errors import InvalidRequest
from app.inference.packed import PackedLinear, pack

NO_ADAPTER = 0
# Steps one adapter must serve every row before its layers are merged: short requests and
# steps between mixed batches do not pay for a merge they would not use.
MERGE_AFTER_STEPS = 8
_WEIGHT = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$"
)
_MAGNITUDE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$"
)


class AdapterNotLoadable(InvalidRequest):
    code = "adapter_not_loadable"


@dataclass(frozen=True)
class AdapterWeights:
    """An adapter read from disk: per module path, A [r, in] and B [out, r] as stored, and the
    scale of B (alpha / r, or alpha / sqrt(r) for rsLoRA); for DoRA, also its magnitude m [out]
    per module. Made fp32 and scaled when they enter a slot, in the thread that runs the model
    (see `Batcher`: the reader's thread does no tensor arithmetic)."""

    key: str
    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)
    scale: float = 1.0

    @property
    def bytes(self) -> int:
        lora = sum(a.nbytes + b.nbytes for a, b in self.modules.values())
        return lora + sum(m.nbytes for m in self.magnitudes.values())


def read_adapter(directory: Path, key: str) -> AdapterWeights:
    """adapter_config.json and adapter_model.safetensors (never a pickle) as AdapterWeights."""
    from safetensors.torch import load_file

    weights_file = directory / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise AdapterNotLoadable(
            f"Adapter {key} has no adapter_model.safetensors; only safetensors weights are loaded.",
            code="adapter_not_safetensors",
        )
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterNotLoadable(f"Adapter {key}: unreadable adapter_config.json ({exc}).") from exc
    if config.get("task_type") == "SEQ_CLS":
        raise AdapterNotLoadable(
            f"Adapter {key} is a reward model: it scores answers, it does not generate text. "
            "Generate with an adapter trained by method supervised, dpo or orpo.",
            code="adapter_not_generative",
        )
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    dora = bool(config.get("use_dora"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(str(weights_file)).items():
        match = _WEIGHT.match(name)
        if match is not None:
            parts.setdefault(match["module"], {})[match["part"]] = tensor
            continue
        magnitude = _MAGNITUDE.match(name)
        if magnitude is None or not dora:
            raise AdapterNotLoadable(f"Adapter {key}: unexpected tensor {name!r}.")
        magnitudes[magnitude["module"]] = tensor
    modules = {}
    for module, pair in parts.items():
        if set(pair) != {"A", "B"}:
            raise AdapterNotLoadable(f"Adapter {key}: {module} lacks lora_A or lora_B.")
        modules[module] = (pair["A"], pair["B"])
    if dora and set(magnitudes) != set(modules):
        lacking = sorted(set(modules) ^ set(magnitudes))[:3]
        raise AdapterNotLoadable(
            f"Adapter {key} is a DoRA adapter, but {', '.join(lacking)} lack a LoRA pair or a "
            "lora_magnitude_vector."
        )
    return AdapterWeights(key, rank, modules, magnitudes, scale)


@dataclass(frozen=True)
class Groups:
    """A mixed batch's rows grouped by slot, for `LoraLinear`'s batched products: slots
    `first`…`first + count - 1` (those between the lowest and the highest slot in use), `size`
    entries each. Entry i holds batch row `gather[i]`; batch row r takes the delta of entry
    `source[r]`. Groups smaller than the largest are padded with entries that gather an
    all-zero row (index `rows`, appended to the input when `padded`); rows without an adapter
    take a zero delta (index `count * size`, appended to the deltas when `bare_rows`)."""

    first: int
    count: int
    size: int
    padded: bool
    bare_rows: bool
    gather: torch.Tensor  # [count * size]
    source: torch.Tensor  # [rows]


class _Rows(threading.local):
    """Which slot each row of the batch in flight uses (set by the one thread that runs it)."""

    single: int | None = None  # every row uses this slot (None: a mix)
    groups: Groups | None = None  # a mix: the rows grouped by slot
    # The last input grouped for a mix, (input, its rows grouped in fp32): layers that share
    # their input (q, k and v; gate and up) group it once.
    grouped_input: tuple[torch.Tensor, torch.Tensor] | None = None
    slot_of_row: torch.Tensor | None = None  # [rows, slots]: 1 at the row's slot (a mix)


class LoraLinear(nn.Module):
    """A base linear layer (`nn.Linear`, or `PackedLinear` on CPUs) plus the LoRA weights of
    every slot: `AT` (A transposed) is [slots, in, rank] and `B` (transposed) is
    [slots, rank, out]. Each slot's matrices are laid out as the right-hand side of a row-major
    product, which CPU matrix products take 2.5 times faster than a transposed one at these
    sizes.

    One adapter for every row: its slot, as two small matmuls. A mix: the rows grouped by slot
    (`Groups`), two `bmm`s over the slots in use, each group with its own slot's weights. Each
    row costs its own adapter's products alone, and the weights are read in place (no per-row
    copy of them). One product over every slot's columns with the foreign ones masked, as
    before, costs every row all the adapters' products: 8 times the arithmetic for 8 adapters,
    which CPUs without AVX512 feel (docs/benchmarks.md).
    """

    def __init__(self, base: nn.Linear | PackedLinear, rows: _Rows, slots: int, rank: int) -> None:
        super().__init__()
        self.base = base
        self.rows = rows
        self.slots = slots
        self.rank = rank
        # fp32 whatever the base's precision: small bf16 matmuls are slow on CPUs (10x, measured).
        device = base.packed.device if isinstance(base, PackedLinear) else base.weight.device
        self.AT = torch.zeros(slots, base.in_features, rank, device=device)  # A transposed
        self.B = torch.zeros(slots, rank, base.out_features, device=device)  # B transposed
        self.used = [False] * slots  # slots this module has weights in
        # DoRA: g per slot and output feature, [slots, out] (1 where the slot is not DoRA);
        # made when the first DoRA adapter targets this module.
        self.g: torch.Tensor | None = None
        self.dora = [False] * slots
        # The base weights with one slot's adapter merged in (see the module docstring).
        self.merged: torch.Tensor | None = None
        self.merged_slot: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.rows.single
        if single is not None and single == self.merged_slot and self.merged is not None:
            if isinstance(self.base, PackedLinear):
                return self.base.forward(x, self.merged)
            return nn.functional.linear(x, self.merged, self.base.bias)
        y: torch.Tensor = self.base(x)
        g: torch.Tensor | None = None
        if single is not None:
            if not self.used[single]:
                return y
            delta = (x.float() @ self.AT[single]) @ self.B[single]
            if self.g is not None and self.dora[single]:
                g = self.g[single]
        else:
            groups = self.rows.groups
            if groups is None or not any(self.used):
                return y
            delta = self._grouped_delta(x, groups).view(y.shape)
            if self.g is not None and any(self.dora) and self.rows.slot_of_row is not None:
                g = (self.rows.slot_of_row @ self.g)[:, None, :]  # each row's slot's g
        if g is None:
            return y.add_(delta.to(y.dtype))
        # DoRA, in PEFT's order: y + ((g - 1) * (y - bias) + g * delta).
        full = y.float()
        bias = self.base.bias
        plain = full if bias is None else full - bias.float()
        return (full + ((g - 1) * plain + g * delta)).to(y.dtype)

    def _grouped_input(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        """x's rows grouped by slot, in fp32: [count, size * positions, in]."""
        cached = self.rows.grouped_input
        if cached is not None and cached[0] is x:
            return cached[1]
        rows, positions, width = x.shape
        flat = x.reshape(rows, positions * width)
        if groups.padded:
            flat = torch.nn.functional.pad(flat, (0, 0, 0, 1))  # row `rows`: zeros
        grouped = flat.index_select(0, groups.gather).float()
        grouped = grouped.view(groups.count, groups.size * positions, width)
        self.rows.grouped_input = (x, grouped)
        return grouped

    def _grouped_delta(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        """Each row's delta from its own slot's adapter (zero without one), fp32:
        [rows, positions * out]."""
        slots = slice(groups.first, groups.first + groups.count)
        low = torch.bmm(self._grouped_input(x, groups), self.AT[slots])
        high = torch.bmm(low, self.B[slots]).view(groups.count * groups.size, -1)
        if groups.bare_rows:
            high = torch.nn.functional.pad(high, (0, 0, 0, 1))  # entry count * size: zeros
        return high.index_select(0, groups.source)

    def grow(self, rank: int) -> None:
        """Room for adapters of a larger rank (zero padding keeps the others exact)."""
        extra = rank - self.rank
        if extra <= 0:
            return
        self.AT = torch.nn.functional.pad(self.AT, (0, extra))
        self.B = torch.nn.functional.pad(self.B, (0, 0, 0, extra))
        self.rank = rank

    def dense_weight(self) -> torch.Tensor:
        """The base layer's weight, [out, in]."""
        if isinstance(self.base, PackedLinear):
            return self.base.dense_weight()
        return self.base.weight

    def merge(self, slot: int) -> None:
        """Keep the base weights with slot `slot`'s adapter merged in, in the base's precision
        (and layout: packed for a `PackedLinear`). One matrix product adds into a copy of the
        weights: 20 times faster than through an fp32 temporary on a CPU, and it rounds once."""
        if self.merged_slot == slot or not self.used[slot]:
            return
        weight = self.dense_weight()
        packed = isinstance(self.base, PackedLinear)
        if packed:
            merged = weight  # a fresh dense copy
        else:
            if self.merged is None:
                self.merged = torch.empty_like(weight)
            merged = self.merged.copy_(weight)
        merged.addmm_(self.B[slot].T.to(weight.dtype), self.AT[slot].T.to(weight.dtype))
        if self.g is not None and self.dora[slot]:
            merged.mul_(self.g[slot][:, None].to(weight.dtype))
        self.merged = pack(merged) if packed else merged
        self.merged_slot = slot

    def put(
        self,
        slot: int,
        a: torch.Tensor | None,
        b: torch.Tensor | None,
        magnitude: torch.Tensor | None = None,
    ) -> None:
        """Slot `slot` gets A [r, in] and B [out, r] (or nothing), and for DoRA the magnitude
        m [out], kept as g = m / ||W + BA||_row (B is scaled already)."""
        if slot == self.merged_slot:
            self.merged_slot = None  # its merged copy is stale
        self.AT[slot].zero_()
        self.B[slot].zero_()
        self.used[slot] = a is not None
        if a is not None and b is not None:
            self.AT[slot, :, : a.shape[0]] = a.T
            self.B[slot, : a.shape[0]] = b.T
        self.dora[slot] = magnitude is not None
        if self.g is not None:
            self.g[slot] = 1.0
        if magnitude is not None and a is not None and b is not None:
            device = self.AT.device
            if self.g is None:
                self.g = torch.ones(self.slots, self.base.out_features, device=device)
            weight = self.dense_weight().float() + b.to(device) @ a.to(device)
            self.g[slot] = magnitude.to(device) / torch.linalg.norm(weight, dim=1)


class LoraSlots:
    """The adapter slots of one base model: which adapter sits in which slot, and the layers.

    Only the thread that runs the model calls `install` and `batch`; layers are wrapped the
    first time an adapter targets them.
    """

    def __init__(self, model: nn.Module, capacity: int, *, merge: bool = True) -> None:
        self.model = model
        self.capacity = capacity
        self.merge = merge  # merge an adapter that serves every row for a while
        self.rows = _Rows()
        self.layers: dict[str, LoraLinear] = {}
        self.rank = 1
        self.slot_of: dict[str, int] = {}
        self._alone: tuple[int, int] = (NO_ADAPTER, 0)  # the slot serving every row, for n steps

    def free_slot(self) -> int | None:
        taken = set(self.slot_of.values())
        return next((s for s in range(1, self.capacity + 1) if s not in taken), None)

    def install(self, weights: AdapterWeights, slot: int) -> None:
        self.check(weights)
        if weights.rank > self.rank:
            self.rank = weights.rank
            for layer in self.layers.values():
                layer.grow(self.rank)
        for name, (a, b) in weights.modules.items():
            magnitude = weights.magnitudes.get(name)
            self._layer(name).put(
                slot,
                a.float(),
                b.float() * weights.scale,
                None if magnitude is None else magnitude.float(),
            )
        for name, layer in self.layers.items():
            if name not in weights.modules:
                layer.put(slot, None, None)
        self.slot_of[weights.key] = slot

    def remove(self, key: str) -> None:
        slot = self.slot_of.pop(key)
        for layer in self.layers.values():
            layer.put(slot, None, None)

    def batch(self, slots: list[int]) -> None:
        """Set the rows of the next forward pass."""
        if len(set(slots)) == 1:
            slot = slots[0]
            steps = self._alone[1] + 1 if self._alone[0] == slot else 1
            self._alone = (slot, steps)
            if self.merge and slot != NO_ADAPTER and steps == MERGE_AFTER_STEPS:
                for layer in self.layers.values():
                    layer.merge(slot)
            self.rows.single, self.rows.groups, self.rows.slot_of_row = slot, None, None
            self.rows.grouped_input = None
            return
        self._alone = (NO_ADAPTER, 0)
        # On the model's device: the LoRA weights are there (a GPU when serving on one).
        device = next(self.model.parameters()).device
        rows = torch.tensor(slots, device=device)[:, None]
        self.rows.single, self.rows.groups = None, grouped_by_slot(slots, device)
        self.rows.grouped_input = None
        self.rows.slot_of_row = (rows == torch.arange(self.capacity + 1, device=device)).float()

    def check(self, weights: AdapterWeights) -> None:
        """Refuse an adapter whose modules or shapes do not fit this base model."""
        for name, (a, b) in weights.modules.items():
            base = self._base_linear(name)
            if base is None:
                raise AdapterNotLoadable(
                    f"Adapter {weights.key} targets {name}, which is not a linear layer of this "
                    "base model: it was trained on another model."
                )
            want_a, want_b = (weights.rank, base.in_features), (base.out_features, weights.rank)
            magnitude = weights.magnitudes.get(name)
            if magnitude is not None and tuple(magnitude.shape) != (base.out_features,):
                raise AdapterNotLoadable(
                    f"Adapter {weights.key}: {name} has a DoRA magnitude of shape "
                    f"{tuple(magnitude.shape)}, expected ({base.out_features},): it was trained "
                    "on another model."
                )
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise AdapterNotLoadable(
                    f"Adapter {weights.key}: {name} has LoRA shapes {tuple(a.shape)} and "
                    f"{tuple(b.shape)}, expected {want_a} and {want_b}: it was trained on "
                    "another model."
                )

    def _base_linear(self, name: str) -> nn.Linear | PackedLinear | None:
        if name in self.layers:
            return self.layers[name].base
        try:
            module = self.model.get_submodule(name)
        except AttributeError:
            return None
        return module if isinstance(module, nn.Linear | PackedLinear) else None

    def _layer(self, name: str) -> LoraLinear:
        if name not in self.layers:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            base = getattr(parent, child)
            layer = LoraLinear(base, self.rows, self.capacity + 1, self.rank)
            setattr(parent, child, layer)
            self.layers[name] = layer
        return self.layers[name]


def grouped_by_slot(slots: list[int], device: torch.device) -> Groups | None:
    """The rows of a mixed batch (row i uses slot slots[i]) grouped by slot; None when no row
    uses an adapter."""
    members: dict[int, list[int]] = {}
    for row, slot in enumerate(slots):
        if slot != NO_ADAPTER:
            members.setdefault(slot, []).append(row)
    if not members:
        return None
    first, last = min(members), max(members)
    size = max(len(rows) for rows in members.values())
    zero_row = len(slots)  # appended to the input when a group is padded
    gather: list[int] = []
    source = [-1] * len(slots)
    for slot in range(first, last + 1):
        group = members.get(slot, [])
        for row in group:
            source[row] = len(gather)
            gather.append(row)
        gather += [zero_row] * (size - len(group))
    zero_entry = len(gather)  # appended to the deltas when a row has no adapter
    source = [zero_entry if entry < 0 else entry for entry in source]
    return Groups(
        first,
        last - first + 1,
        size,
        zero_row in gather,
        zero_entry in source,
        torch.tensor(gather, dtype=torch.long, device=device),
        torch.tensor(source, dtype=torch.long, device=device),
    )
