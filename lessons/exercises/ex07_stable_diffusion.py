"""Exercises for lesson 07, the checkpoint's key names. Check them with:  python -m minildm.check 07

The reference is `minildm.convert` (`ema_key`, `split_original`). An original Stable Diffusion v1
checkpoint is one flat dict of tensors. The UNet's weights sit under "model.diffusion_model."
(e.g. "model.diffusion_model.input_blocks.0.0.weight"); the training run's exponential moving
average of the same weights, when the file has it, sits under "model_ema." with the rest of the name
run together without dots: "model_ema.diffusion_modelinput_blocks00weight".
"""


def ema_key(unet_key: str) -> str:
    """The EMA key of a UNet weight, from its name inside the UNet (without "model.diffusion_model.").

    "input_blocks.0.0.weight" -> "model_ema.diffusion_modelinput_blocks00weight": put
    "diffusion_model." in front, remove every ".", then put "model_ema." in front.
    """
    raise NotImplementedError


def unet_weights(state: dict, use_ema: bool) -> dict:
    """The UNet's state dict (keys without the "model.diffusion_model." prefix) from a checkpoint.

    1. Collect every key that starts with "model.diffusion_model.", with that prefix removed.
    2. If use_ema is true and the checkpoint has EMA weights (any key starting with "model_ema."
       other than the two bookkeeping entries "model_ema.decay" and "model_ema.num_updates"), return
       for each UNet key the tensor stored under ema_key(key) instead.
    Return a new dict {unet key: tensor}.
    """
    raise NotImplementedError
