"""MILAN: masked image pretraining on language-assisted representation.

    import milan
    teacher = milan.build_teacher("openclip:ViT-B-16", weights="ViT-B-16.pt")
    out = teacher(images)                                   # tokens [B,1+N,Dt], cls_attn [B,N]
    mask = milan.masking.semantic_masking(out.cls_attn, mask_ratio=0.75)
    model = milan.build_model("milan_vit_base_patch16", target_dim=teacher.dim)
    loss = model(images, mask, out.tokens).loss
"""

__version__ = "0.1.0"

from milan import loss, masking  # noqa: E402
from milan.model import MaskedAutoencoder, build_model  # noqa: E402
from milan.teacher import TeacherOutput, build_teacher  # noqa: E402

__all__ = ["__version__", "build_model", "build_teacher", "MaskedAutoencoder", "TeacherOutput", "loss", "masking"]
