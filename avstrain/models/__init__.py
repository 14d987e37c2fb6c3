"""The model registry (`build_model` dispatches on `model.kind`) and the models registered in it.

Each model family lives in its own file and registers a `ModelKind` (`@register_model(...)`); importing this
package registers them all: `tpavi_avs` ("tpavi", the AVSBench TPAVI model, with its backbones, crop encoder and
AVSBench checkpoint compatibility), and the sound-source localisation and correspondence models of docs/design.md §13,
`senocak` ("senocak"), `avenet` ("avenet") and `avolnet` ("avolnet"), on the trunk of `localiser_base`.
"""

from .avsbench_compat import (AVSBenchCheckpointError, convert_avsbench_state_dict, load_avsbench_checkpoint,
                              map_avsbench_key)
from .backbones import Backbone, PVTv2Backbone, ResNetBackbone, build_backbone
from .crop_encoder import CropEncoder, CropOutput
from .registry import (ModelKind, build_for_shards, build_model, get_kind, register_model, registered_kinds,
                       resolve_kind_settings)
from .tpavi import TPAVI, TPAVIOutput, tpavi_naive
from .tpavi_avs import AVSModel, AVSOutput, DilatedNeck, FeatureFusionBlock, ResidualConvUnit, TPAVIKind
from .localiser_base import CorrespondenceKind, FrameEncoder, PairedAudioKind
from .senocak import SenocakKind, SenocakNet, SenocakOutput
from .avenet import AVENet, AVENetKind, AVEOutput
from .avolnet import AVOLNet, AVOLNetKind, AVOLOutput

__all__ = [
    "ModelKind", "build_for_shards", "build_model", "get_kind", "register_model", "registered_kinds",
    "resolve_kind_settings",
    "AVSModel", "AVSOutput", "TPAVIKind", "DilatedNeck", "FeatureFusionBlock", "ResidualConvUnit",
    "AVSBenchCheckpointError", "convert_avsbench_state_dict", "load_avsbench_checkpoint", "map_avsbench_key",
    "Backbone", "PVTv2Backbone", "ResNetBackbone", "build_backbone",
    "CropEncoder", "CropOutput",
    "TPAVI", "TPAVIOutput", "tpavi_naive",
    "CorrespondenceKind", "FrameEncoder", "PairedAudioKind", "SenocakKind", "SenocakNet", "SenocakOutput",
    "AVENet", "AVENetKind", "AVEOutput", "AVOLNet", "AVOLNetKind", "AVOLOutput",
]
