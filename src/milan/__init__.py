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

import importlib

__version__ = "0.1.0"

# The public names are imported on first use (PEP 562), so `import milan` and `milan --help` do not
# pay for torch and timm; `from milan import build_model` works as usual.
_EXPORTS = {
    "build_model": "milan.model", "MaskedAutoencoder": "milan.model", "ModelSpec": "milan.model",
    "build_teacher": "milan.teacher", "TeacherOutput": "milan.teacher",
    "load_pretrained": "milan.io.weights", "Pretrained": "milan.io.weights",
    "MILAN": "milan.pretraining", "StepOutput": "milan.pretraining",
    "UserError": "milan.errors",
    "loss": None, "masking": None,  # submodules
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'milan' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = importlib.import_module(f"milan.{name}") if module is None else getattr(
        importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
