"""The TPAVI AVS model, its backbones, crop encoder and AVSBench checkpoint compatibility."""

from .avs import AVSModel, AVSOutput, DilatedNeck, FeatureFusionBlock, ResidualConvUnit, build_model
from .avsbench_compat import (AVSBenchCheckpointError, convert_avsbench_state_dict, load_avsbench_checkpoint,
                              map_avsbench_key)
from .backbones import Backbone, PVTv2Backbone, ResNetBackbone, build_backbone
from .crop_encoder import CropEncoder, CropOutput
from .tpavi import TPAVI, TPAVIOutput, tpavi_naive

__all__ = [
    "AVSModel", "AVSOutput", "build_model", "DilatedNeck", "FeatureFusionBlock", "ResidualConvUnit",
    "AVSBenchCheckpointError", "convert_avsbench_state_dict", "load_avsbench_checkpoint", "map_avsbench_key",
    "Backbone", "PVTv2Backbone", "ResNetBackbone", "build_backbone",
    "CropEncoder", "CropOutput",
    "TPAVI", "TPAVIOutput", "tpavi_naive",
]
