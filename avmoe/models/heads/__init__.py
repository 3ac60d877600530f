"""Task heads on top of the shared trunk (registered in ``HEADS``)."""

from avmoe.models.heads.ave import AVEHead
from avmoe.models.heads.avqa import AVQAHead
from avmoe.models.heads.avs import AVSHead
from avmoe.models.heads.avvp import AVVPHead
from avmoe.models.heads.temporal import TemporalAttention

__all__ = ["AVEHead", "AVQAHead", "AVSHead", "AVVPHead", "TemporalAttention"]
