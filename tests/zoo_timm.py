"""timm: one small model of every family (a module of ``timm.models``) that builds with random weights and runs at
a small input, for the oracle of tests/zoo.py and for benchmarks/zoo_counts.py (which sets Torch-Pruning beside).

Each entry is ``family: (model name, input size, keyword arguments)``: the family's smallest model by its name
(``test_*``, ``atto``, ``nano``, ``tiny``...), and the smallest of 64, 96, 128 and its own size at which it runs;
``img_size`` makes a transformer's position embeddings for that input where the model takes it. Left out: the three
families whose smallest model has over 150M parameters (``deepseek_vit``, ``gemma4_vit``, ``mobilenetv5``).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from zoo import Case

MODELS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "beit": ("beit_base_patch16_224", 64, {"img_size": 64}),
    "byoanet": ("halonet_h1", 256, {}),
    "byobnet": ("test_byobnet", 64, {"img_size": 64}),
    "cait": ("cait_xxs24_224", 64, {"img_size": 64}),
    "coat": ("coat_lite_tiny", 64, {"img_size": 64}),
    "convit": ("convit_tiny", 64, {"img_size": 64}),
    "convmixer": ("convmixer_768_32", 64, {}),
    "convnext": ("test_convnext", 64, {}),
    "cpubone": ("cpubone_nano", 64, {}),
    "crossvit": ("crossvit_tiny_240", 64, {}),
    "csatv2": ("csatv2", 64, {}),
    "cspnet": ("cs3darknet_focus_s", 64, {}),
    "cspnext": ("cspnext_tiny", 64, {}),
    "davit": ("davit_tiny", 64, {}),
    "deit": ("deit_tiny_patch16_224", 64, {"img_size": 64}),
    "densenet": ("densenet121", 64, {}),
    "dla": ("dla46x_c", 64, {}),
    "dpn": ("dpn48b", 64, {}),
    "edgenext": ("edgenext_xx_small", 64, {}),
    "efficientformer": ("efficientformer_l1", 224, {}),
    "efficientformer_v2": ("efficientformerv2_s0", 64, {"img_size": 64}),
    "efficientnet": ("test_efficientnet", 64, {}),
    "efficientvim": ("efficientvim_m1", 64, {}),
    "efficientvit_mit": ("efficientvit_b0", 64, {}),
    "efficientvit_msra": ("efficientvit_m0", 64, {"img_size": 64}),
    "eva": ("eva02_tiny_patch14_224", 64, {"img_size": 64}),
    "fasternet": ("fasternet_t0", 64, {}),
    "fastvit": ("fastvit_t8", 64, {}),
    "focalnet": ("focalnet_tiny_srf", 64, {}),
    "gcvit": ("gcvit_xxtiny", 64, {"img_size": 64}),
    "ghostnet": ("ghostnet_050", 64, {}),
    "hardcorenas": ("hardcorenas_a", 64, {}),
    "hgnet": ("hgnetv2_b0", 64, {}),
    "hiera": ("hiera_tiny_224", 64, {"img_size": 64}),
    "hieradet_sam2": ("sam2_hiera_tiny", 64, {}),
    "hrnet": ("hrnet_w18_small", 64, {}),
    "iformer": ("iformer_t", 64, {}),
    "inception_next": ("inception_next_atto", 64, {}),
    "inception_resnet_v2": ("inception_resnet_v2", 96, {}),
    "inception_v3": ("inception_v3", 96, {}),
    "inception_v4": ("inception_v4", 96, {}),
    "lcnetv2": ("lcnetv2_small", 64, {}),
    "levit": ("levit_128", 64, {"img_size": 64}),
    "lowformer": ("lowformer_b0", 64, {}),
    "mambaout": ("test_mambaout", 64, {}),
    "maxxvit": ("test_maxvit", 64, {"img_size": 64}),
    "metaformer": ("poolformerv2_s12", 64, {}),
    "mlp_mixer": ("mixer_s32_224", 64, {"img_size": 64}),
    "mobilenetv3": ("mobilenetv3_small_050", 64, {}),
    "mobilevit": ("mobilevit_xxs", 64, {"img_size": 64}),
    "mvitv2": ("mvitv2_tiny", 64, {"img_size": 64}),
    "naflexvit": ("naflexvit_base_patch16_gap", 64, {"img_size": 64}),
    "nasnet": ("nasnetalarge", 64, {}),
    "nest": ("nest_tiny", 64, {"img_size": 64}),
    "nextvit": ("nextvit_small", 64, {}),
    "nfnet": ("nf_resnet26", 64, {}),
    "pit": ("pit_xs_224", 64, {"img_size": 64}),
    "pnasnet": ("pnasnet5large", 64, {}),
    "pvt_v2": ("pvt_v2_b0", 64, {}),
    "qwen3_vit": ("qwen3_vit_88m", 64, {"img_size": 64}),
    "rdnet": ("rdnet_tiny", 64, {}),
    "regnet": ("regnetx_002", 64, {}),
    "repghost": ("repghostnet_050", 64, {}),
    "repvit": ("repvit_m0_9", 64, {"img_size": 64}),
    "res2net": ("res2net50_14w_8s", 64, {}),
    "resnest": ("resnest14d", 64, {}),
    "resnet": ("test_resnet", 64, {}),
    "resnetv2": ("resnetv2_18", 64, {}),
    "rexnet": ("rexnet_100", 64, {}),
    "selecsls": ("selecsls42b", 64, {}),
    "senet": ("legacy_seresnet18", 64, {}),
    "sequencer": ("sequencer2d_s", 64, {"img_size": 64}),
    "shvit": ("shvit_s1", 64, {}),
    "sknet": ("skresnet18", 64, {}),
    "starnet": ("starnet_s1", 64, {}),
    "swiftformer": ("swiftformer_xs", 64, {"img_size": 64}),
    "swin_transformer": ("swin_tiny_patch4_window7_224", 64, {"img_size": 64}),
    "swin_transformer_v2": ("swinv2_tiny_window8_256", 64, {"img_size": 64}),
    "swin_transformer_v2_cr": ("swinv2_cr_tiny_224", 64, {"img_size": 64}),
    "tiny_vit": ("tiny_vit_5m_224", 64, {}),
    "tnt": ("tnt_s_patch16_224", 64, {"img_size": 64}),
    "tresnet": ("tresnet_m", 64, {}),
    "twins": ("twins_svt_small", 64, {"img_size": 64}),
    "vgg": ("vgg11", 64, {}),
    "visformer": ("visformer_tiny", 64, {"img_size": 64}),
    "vision_transformer": ("test_vit", 64, {"img_size": 64}),
    "vision_transformer_hybrid": ("vit_tiny_r_s16_p8_224", 64, {"img_size": 64}),
    "vision_transformer_relpos": ("test_vit_relpos", 64, {"img_size": 64}),
    "vision_transformer_sam": ("samvit_base_patch16", 64, {"img_size": 64}),
    "vitamin": ("vitamin_small_224", 64, {"img_size": 64}),
    "volo": ("volo_d1_224", 64, {"img_size": 64}),
    "vovnet": ("ese_vovnet19b_dw", 64, {}),
    "xception": ("legacy_xception", 64, {}),
    "xception_aligned": ("xception41", 64, {}),
    "xcit": ("xcit_nano_12_p16_224", 64, {"img_size": 64}),
}


def build_timm(name: str, size: int, kwargs: dict[str, Any]) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model (random weights, eval mode) and two inputs of ``size`` x ``size``, the example and a fresh one."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(2, 3, size, size, generator=g), torch.randn(2, 3, size, size, generator=g)


def _builder(name: str, size: int, kwargs: dict[str, Any]) -> Any:
    return lambda: build_timm(name, size, kwargs)


#: families whose convolutions standardise their weights in forward (NF-ResNets): masked input channels stay
KEEPS = {"nfnet"}

CASES = {family: Case(_builder(*spec), keeps=family in KEEPS) for family, spec in MODELS.items()}
