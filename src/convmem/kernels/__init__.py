"""Triton kernels, each beside a plain-PyTorch ``*_ref`` twin (Triton is optional, imported lazily)."""
from .depthwise import ACTIVATIONS, depthwise_conv1d, depthwise_conv1d_ref, kernels_usable, triton_available

__all__ = ["ACTIVATIONS", "depthwise_conv1d", "depthwise_conv1d_ref", "kernels_usable", "triton_available"]
