"""Dense transfer (paper Tables 3 and 6): a ViT pyramid backbone, UperNet segmentation and Mask R-CNN."""

from milan.dense.backbone import LayerNorm2d, ViTPyramid, default_out_indices, layer_decay_groups

__all__ = ["ViTPyramid", "LayerNorm2d", "default_out_indices", "layer_decay_groups"]
