"""Receptive field, stride and locality of modules over the time axis (analytic, confirmed by probing)."""
from .receptive_field import OutputMap, ReceptiveField, receptive_field

__all__ = ["receptive_field", "ReceptiveField", "OutputMap"]
