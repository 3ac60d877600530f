"""Frozen encoders (registered in ``avmoe.models.registries.BACKBONES``)."""

from avmoe.models.backbones.htsat import HTSAT, convert_official_htsat
from avmoe.models.backbones.swin import SwinV2Visual, load_swin_weights
from avmoe.models.backbones.weights import WeightLoadError, read_state_dict

__all__ = ["HTSAT", "SwinV2Visual", "WeightLoadError", "convert_official_htsat",
           "load_swin_weights", "read_state_dict"]
