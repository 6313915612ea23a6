"""convmem: where a Conv1d model's GPU memory goes, and the cheapest exact way to make it fit."""
from . import kernels, zoo
from ._units import format_bytes, parse_bytes
from .analysis import ReceptiveField, receptive_field
from .nn import restore_
from .plan import Plan, apply_
from .profile import MemoryProfile, profile
from .strategies.checkpoint import CheckpointConfig, checkpoint_
from .strategies.depthwise import DepthwiseSeparableConfig, to_depthwise_separable_
from .strategies.downsample import DownsampleConfig, downsample_
from .strategies.fuse import FuseConfig, fuse_
from .strategies.infer import infer_tiled
from .strategies.offload import OffloadConfig, offload_
from .strategies.optimize import InfeasibleBudget, OptimizeConfig, optimize_
from .strategies.tile import TileConfig, tile_

__version__ = "0.1.0"

__all__ = [
    # plan to a budget
    "optimize_", "OptimizeConfig", "Plan", "apply_", "InfeasibleBudget",
    # measure
    "profile", "MemoryProfile", "receptive_field", "ReceptiveField",
    # exact strategies
    "checkpoint_", "CheckpointConfig", "tile_", "TileConfig", "infer_tiled", "offload_", "OffloadConfig", "restore_",
    "fuse_", "FuseConfig",
    # lossy, opt-in
    "to_depthwise_separable_", "DepthwiseSeparableConfig", "downsample_", "DownsampleConfig",
    # workloads and units
    "kernels", "zoo", "parse_bytes", "format_bytes", "__version__",
]
