"""Drop-in modules: the wrappers strategies put in, and lossy replacements for Conv1d."""
from ._wrapper import ModuleWrapper, restore_, unwrap
from .batch_chunked import BatchChunked
from .checkpointed import Checkpointed
from .compact_pool import CompactMaxPool1d
from .conv_as_2d import Conv1dAs2d
from .conv_as_matmul import Conv1dAsMatmul
from .conv_phases import Conv1dByPhases
from .eager_island import EagerIsland
from .depthwise_separable import DepthwiseSeparableConv1d
from .downsample import DownsampleConv1d
from .fused_depthwise import FusedActivation, FusedDepthwiseConv1d
from .fused_norm_conv import FusedNormActConv
from .offloaded import OffloadGroup, Offloaded
from .saved_precision import LowPrecisionSaved
from .tiled import Tiled

__all__ = ["ModuleWrapper", "Checkpointed", "Tiled", "Offloaded", "OffloadGroup", "LowPrecisionSaved", "BatchChunked", "DepthwiseSeparableConv1d", "DownsampleConv1d", "FusedDepthwiseConv1d", "FusedNormActConv",
           "FusedActivation", "CompactMaxPool1d", "Conv1dAs2d", "Conv1dAsMatmul", "Conv1dByPhases", "EagerIsland", "restore_", "unwrap"]
