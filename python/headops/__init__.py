"""headops: attention in which every head behaves differently (see docs/DESIGN.md)."""

import torch  # noqa: F401  (loads libtorch before the extension)

from ._build import check_torch as _check_torch

_check_torch(torch.__version__)  # (before the extension loads against it)

from . import _C  # noqa: F401  (loads the kernels and registers torch.ops.headops)
from . import _fake  # noqa: F401  (fake kernels for torch.compile)
from . import _autograd  # noqa: F401  (gradients of the attention op)
from .attention import attention
from .probes import Probe, ProbeResult, Recording, probe
from .cache import HeadSparseCache
from .prefill import DensePrefill, capture_prefill
from .spec import HeadSpec
from .patching import attention_layers, patch, patched_spec, set_spec, unpatch
from .research import importance, pruning_curve, shapley
from .counters import WorkCounts, count_work, work_counters, reset_work_counters

__all__ = ["attention", "Probe", "ProbeResult", "Recording", "probe", "HeadSparseCache", "DensePrefill", "capture_prefill", "HeadSpec", "attention_layers", "patch", "patched_spec", "set_spec", "unpatch", "importance", "pruning_curve", "shapley", "WorkCounts", "count_work", "work_counters", "reset_work_counters"]
__version__ = "0.1.0"
