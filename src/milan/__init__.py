"""MILAN: masked image pretraining on language-assisted representation.

    import milan
    teacher = milan.build_teacher("openclip:ViT-B-16", weights="ViT-B-16.pt")
    model = milan.build_model("milan_vit_base_patch16", target_dim=teacher.dim)
    step = milan.MILAN(model, teacher=teacher)      # teacher → semantic-aware mask → model → eq. 1
    out = step(images)                              # .loss .pred .target .mask .token_loss
    out.loss.backward()

    pretrained = milan.load_pretrained("runs/pretrain")   # run folder, checkpoint or export
    encoder = pretrained.encoder()                        # timm-named ViT, ready to transfer
"""

__version__ = "0.1.0"

from milan import loss, masking  # noqa: E402
from milan.errors import UserError  # noqa: E402
from milan.io.weights import Pretrained, load_pretrained  # noqa: E402
from milan.model import MaskedAutoencoder, ModelSpec, build_model  # noqa: E402
from milan.pretraining import MILAN, StepOutput  # noqa: E402
from milan.teacher import TeacherOutput, build_teacher  # noqa: E402

__all__ = ["__version__", "build_model", "build_teacher", "load_pretrained", "MaskedAutoencoder", "MILAN",
           "ModelSpec", "Pretrained", "StepOutput", "TeacherOutput", "UserError", "loss", "masking"]
