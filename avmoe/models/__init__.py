"""AVMoE models: frozen Swin-V2 + HTS-AT trunk with adapters, and the task heads.

Layout (one module per concept):

* ``backbones/``: ``swin.py`` (visual), ``audio_frontend.py`` + ``htsat.py`` (audio),
  ``weights.py`` (local weight files, errors that name keys);
* ``adapters/``: ``bridge.py``, ``router.py``, ``experts.py``, ``moe.py`` (AVMoE),
  ``lavish.py``, ``avpea.py``;
* ``trunk.py``: the paired-block loop; ``preprocess.py``: on-device input preparation;
* ``heads/``: ``temporal.py`` (shared by AVE and AVS), ``ave.py``, ``grouping.py`` + ``avvp.py``,
  ``avs.py``, ``avqa.py``;
* ``model.py``: preprocessing + trunk + head; ``registries.py``: BACKBONES, ADAPTERS, HEADS.

Deviations from the released code (the spec's §8 choices are listed in ``avmoe/config.py``):

1. timm 1.0.31 instead of 0.6.12: patch merging runs at the start of stages 1-3; the trunk
   applies it there, which is the same computation. The Swin-V2 21,841-way classifier
   (~33.5 M unused parameters) is not built.
2. Backbones are in eval mode by default (no BN drift, no DropPath, no SpecAugment or mixup);
   ``backbone_train_mode`` + ``audio.spec_augment`` / ``audio.mixup`` restore the code's
   behaviour ("official" presets).
3. HTS-AT stays frozen in every task; the AVS-S4 script fine-tunes it through a name-filter bug.
4. The HTS-AT mel filterbank is computed with torchaudio (Slaney, as librosa/torchlibrosa) and
   replaced by the checkpoint's ``melW`` when present; STFT via ``torch.stft``.
5. Frames of another size than the model's are resized on the device, then normalised: in the
   "paper" / "tiny" presets of AVE, AVVP and AVQA with antialiased bicubic interpolation clamped
   to [0, 1] (``visual.antialias=True``, close to PIL); in every "official" preset and in AVS
   with plain bicubic interpolation, no antialiasing, no clamp, which is what the official
   loaders (torchvision 0.14 tensor ``Resize``) and the AVS model compute.
6. Missing modality: zeros after preparation (mean-grey normalised frame, silent waveform).
7. Modules whose parameters never receive a gradient are not built: CMRAN decoders' unused
   self-attention, AVS TemporalAttention decoders, the first residual unit of AVS's coarsest
   fusion block, PVT-v2 / VGGish / ``conv1..4``, the encoder / decoder layer templates the
   CMRAN modules keep beside their deep copies. (AVE head: 7.88 M here, exactly the 7.88 M the
   official head uses; the official code instantiates 12.09 M.)
8. AVVP runs at any batch size (the code needs B = 1); AVQA negatives are the frames of
   another batch sample (``roll(1)``), not a random other video.
9. AVS: BCE from logits; TPAVI computed as theta (phi^T g) (no THW x THW matrix); the AVM loss
   sees ReLU'd maps, as the code's in-place ReLU leaves them.
10. The dense bridge's 1x1 Conv2d over tokens is a Linear over the token axis (same parameters
    and init); the bottleneck's 1x1 grouped Conv2d is a Conv1d.

Importing this package is light; ``AVModel`` / ``AVTrunk`` import torch and timm.
"""

from avmoe.models.registries import ADAPTERS, BACKBONES, HEADS

__all__ = ["ADAPTERS", "BACKBONES", "HEADS", "AVModel", "AVTrunk"]


def __getattr__(name: str):
    if name == "AVModel":
        from avmoe.models.model import AVModel

        return AVModel
    if name == "AVTrunk":
        from avmoe.models.trunk import AVTrunk

        return AVTrunk
    raise AttributeError(name)
