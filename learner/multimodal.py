"""The learner's side of a turn with images: pixel inputs and logprobs, never re-tokenized.

store -> learner -> **trainer**. A recorded turn with screenshots holds the prompt token
ids vLLM used (each image already expanded into its placeholder tokens) and the images
themselves. To train on it, the learner gives the vision-language model those ids
unchanged plus the image processor's pixel inputs for the same images, in prompt order:
the processor's image half only, so the text is never tokenized again. On the VLM toy
this reproduces vLLM's sampled logprobs to within 1e-6 (docs/vlm-on-cpu.md).

LoRA on a VLM goes on the language model's projections only (``LANGUAGE_LORA_TARGETS``);
the vision tower and the connector stay frozen. vLLM loads such an adapter and serves
images through it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image
    from transformers import PreTrainedModel, ProcessorMixin

# Idefics3 names its language model ``model.text_model``; Qwen2-VL, LLaVA and most others
# ``model.language_model``. A peft regex: the attention and MLP projections of either.
LANGUAGE_LORA_TARGETS = (r".*\.(text_model|language_model)\.layers\.\d+\."
                         r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))")


def image_token_id(model_dir: Path | str) -> int | None:
    """The token a vision-language model's chat template writes for each image (vLLM
    expands it into the image's placeholder range); None for a text-only model. From the
    model's ``config.json`` (``image_token_id``, or LLaVA's ``image_token_index``)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "vision_config" not in config:
        return None
    token = config.get("image_token_id", config.get("image_token_index"))
    return int(token) if isinstance(token, int) else None


class ImageError(ValueError):
    """An image that cannot be decoded (not a data: URL, not base64, not an image)."""


def decode_image(url: str) -> Image:
    """A ``data:image/...;base64,...`` URL as an RGB image, as vLLM decodes it."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    header, sep, data = url.partition(",")
    if not (sep and header.startswith("data:image/") and header.endswith(";base64")):
        raise ImageError(f"not a base64 data: URL of an image: {url[:40]!r}")
    try:
        image = PILImage.open(io.BytesIO(base64.b64decode(data, validate=True)))
        return image.convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError) as exc:
        raise ImageError(f"cannot decode the image in {url[:40]!r}: {exc}") from exc


def pixel_inputs(processor: ProcessorMixin, images: Sequence[Image]) -> dict[str, torch.Tensor]:
    """The model's image inputs (``pixel_values`` and friends) for one prompt's images,
    in prompt order; empty for a prompt without images."""
    if not images:
        return {}
    found = processor.image_processor(images=[list(images)], return_tensors="pt")
    return {key: value for key, value in found.items() if key not in ("rows", "cols")}


def completion_logprobs(model: PreTrainedModel, prompt_ids: Sequence[int],
                        completion_ids: Sequence[int], pixels: Mapping[str, Any],
                        ) -> torch.Tensor:
    """log p(completion token t | prompt, images, tokens before t), shape [T], with the
    model's gradients (call under ``torch.no_grad()`` to score only)."""
    import torch

    device = next(model.parameters()).device
    ids_1_L = torch.tensor([[*prompt_ids, *completion_ids]], device=device)
    logits_L_V = model(input_ids=ids_1_L, **{k: v.to(device) for k, v in pixels.items()}
                       ).logits[0].float()
    p, t = len(prompt_ids), len(completion_ids)
    # logits at position i predict token i + 1
    logp_T_V = torch.log_softmax(logits_L_V[p - 1: p + t - 1], dim=-1)
    return logp_T_V.gather(-1, ids_1_L[0, p:, None])[:, 0]
