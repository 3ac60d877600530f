"""avmoe: AVMoE-style audio-visual parameter-efficient models, trained on Ray + DeepSpeed.

Importing the package is cheap (no torch); the sub-packages import what they need.
"""

__version__ = "0.1.0"
