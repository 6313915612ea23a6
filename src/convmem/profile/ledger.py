"""The live set of device storages through a step, simulated on the meta device.

# NOTE [Simulated CUDA allocator]
# Every aten op's outputs are registered as they are made; a weak reference to each storage tells
# when autograd or Python lets it go. What the meta run cannot see is modelled the way the CUDA
# caching allocator counts ``max_memory_allocated``: each block is rounded up to 512 bytes, and
# ops that use cuDNN/cuBLAS scratch space add it to the live bytes for the duration of the op
# (see `workspace.py`). Reserved-but-free cache (fragmentation) is not "allocated" and is not
# modelled; `max_memory_reserved` can be larger.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Tuple

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from .recorder import tensors_in

CUDA_BLOCK = 512

# Kinds of storage, for the breakdown of the peak.
RESIDENT, KEPT, GRAD, OPTIMIZER, TRANSIENT = "resident", "kept", "grad", "optimizer", "transient"


def cuda_block_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator counts for an allocation of `nbytes`."""
    if nbytes == 0:
        return 0
    return -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK


class LiveSet(TorchDispatchMode):
    """Tracks the bytes of live storages on one device type while ops run under it.

    `cuda_model` (a `workspace.CudaModel`), when given, says what scratch bytes an op needs while
    it runs (they count towards the peak at that op only) and what library workspace stays
    allocated once an op has run (it counts from then on, as ``workspace``).
    """

    def __init__(self, device_type: str = "meta", cuda_model=None):
        super().__init__()
        self.device_type = device_type
        self.cuda_model = cuda_model
        self.persistent_bytes = 0
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_members: List[Tuple[int, int]] = []  # (serial, bytes) live at the peak
        self.peak_workspace = 0
        self.peak_op = ""
        self.peak_index = 0  # position of the peak in `timeline`
        self.timeline: List[int] = []  # live bytes after every op (workspace included)
        self.phase_starts: Dict[str, int] = {}
        self.kinds: Dict[int, str] = {}  # serial -> kind (see module constants)
        self._serials = WeakIdKeyDictionary()
        self._members: Dict[int, Tuple[weakref.ref, int]] = {}
        self._next_serial = 0

    # -- registration ----------------------------------------------------------------------
    def add(self, storage, kind: str = TRANSIENT) -> int:
        serial = self._serials.get(storage)
        if serial is not None:
            return serial
        serial = self._next_serial
        self._next_serial += 1
        nbytes = cuda_block_bytes(storage.nbytes())
        self._serials[storage] = serial
        self._members[serial] = (weakref.ref(storage, self._released(serial)), nbytes)
        self.kinds[serial] = kind
        self.live_bytes += nbytes
        return serial

    def _released(self, serial: int):
        def callback(_ref):
            member = self._members.pop(serial, None)
            if member is not None:
                self.live_bytes -= member[1]

        return callback

    def serial(self, storage) -> Optional[int]:
        return self._serials.get(storage)

    def tag(self, storage, kind: str) -> None:
        """Mark a registered storage as `kind` (kept, grad, optimizer)."""
        serial = self._serials.get(storage)
        if serial is not None:
            self.kinds[serial] = kind

    def mark_phase(self, name: str) -> None:
        self.phase_starts[name] = len(self.timeline)

    def _observe(self, extra: int, op_name: str) -> None:
        current = self.live_bytes + extra
        self.timeline.append(current)
        if current > self.peak_bytes:
            self.peak_bytes = current
            self.peak_workspace = extra + self.persistent_bytes
            self.peak_op = op_name
            self.peak_index = len(self.timeline) - 1
            self.peak_members = [(s, m[1]) for s, m in self._members.items()]

    # -- dispatch --------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for t in tensors_in(out):
            if t.device.type == self.device_type:
                self.add(t.untyped_storage())
        extra = 0
        if self.cuda_model is not None:
            if not self.persistent_bytes:
                self.persistent_bytes = self.cuda_model.persistent_bytes(func)
                self.live_bytes += self.persistent_bytes
            extra = self.cuda_model.workspace_bytes(func, args, kwargs, out)
        self._observe(extra, str(func))
        return out

    def breakdown_at_peak(self) -> Dict[str, int]:
        """Bytes live at the peak, by kind, plus library scratch space as ``workspace``."""
        parts = {RESIDENT: 0, KEPT: 0, GRAD: 0, OPTIMIZER: 0, TRANSIENT: 0}
        for serial, nbytes in self.peak_members:
            parts[self.kinds[serial]] += nbytes
        parts["workspace"] = self.peak_workspace
        return parts
