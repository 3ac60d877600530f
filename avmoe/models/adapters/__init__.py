"""Adapters inserted into the paired backbone blocks (registered in ``ADAPTERS``)."""

from avmoe.models.adapters.avpea import AVPEAAdapter
from avmoe.models.adapters.bridge import ModalityBridge, StreamSpec, resample_tokens
from avmoe.models.adapters.experts import Bottleneck, CrossModalExpert, TokenCompression, UnimodalExpert
from avmoe.models.adapters.lavish import LavishAdapter
from avmoe.models.adapters.moe import MoEAdapter
from avmoe.models.adapters.router import Router, load_balance_loss

__all__ = [
    "AVPEAAdapter", "Bottleneck", "CrossModalExpert", "LavishAdapter", "ModalityBridge",
    "MoEAdapter", "Router", "StreamSpec", "TokenCompression", "UnimodalExpert",
    "load_balance_loss", "resample_tokens",
]
