"""The embedded default model: built locally, served by vLLM, later trained by the learner.

Data flow: ``ensure_toy_model(data_dir)`` -> ``<data_dir>/models/toy-<digest>/`` -> vLLM
``--model`` -> agent traffic through the proxy -> the learner trains LoRA adapters on it.

No model hub is reachable where this project runs, so the default model is made here from
nothing, deterministically (same recipe, byte-identical files):

    build_tokenizer  ->  init_model  ->  stages  ->  save
    (byte-level BPE on    (tiny Qwen2,     (pretrain,   (safetensors, tokenizer,
     a synthetic corpus)   seeded init)     optional)    chat template)

The default recipe is untrained (random weights, a few seconds): enough to serve and to
test the plumbing. A recipe with a ``pretrain`` stage (a ``Pretraining``: the experiment's
``nextstate.experiment.pretrain.TRAINED_TOY`` is one) is trained from scratch for a few
minutes on synthetic conversations, so that it answers word problems in four style
attributes and follows hints, the starting point of the miniature personalization
experiment.
torch, transformers and tokenizers are imported inside the build functions: the cache lookup
is cheap to import, even where the learner extra is not installed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from nextstate.learner.toy_corpus import synthetic_corpus

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# Bump whenever the build code changes its output, so cached models are rebuilt.
BUILDER_VERSION = 1

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Ordinary (not special) added tokens, so a tool call costs one token to open and close and
# vLLM's hermes tool parser finds them in the vocabulary; they survive skip_special_tokens.
TOOL_CALL_TOKENS = ("<tool_call>", "</tool_call>")

# Qwen2's pre-tokenizer split: single digits, so numbers are spelled out digit by digit.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

Progress = Callable[[str], None]
# A stage changes the freshly initialised model in place (e.g. pretraining), before saving.
Stage = Callable[
    ["PreTrainedModel", "PreTrainedTokenizerFast", "ToyModelRecipe", Progress], None
]


class Pretraining(Protocol):
    """A pretraining stage's recipe: a frozen dataclass (its fields are part of the
    model's digest) that adds text to the tokenizer's corpus and trains the fresh model."""

    def corpus(self) -> list[str]: ...

    def train(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast,
              progress: Progress | None = None) -> None: ...


@dataclass(frozen=True)
class ToyModelRecipe:
    """Everything that determines the built files; its digest names the cache directory."""

    seed: int = 0
    # Qwen2ForCausalLM. head_dim = hidden_size / num_attention_heads must be 64 or more for
    # vLLM's CPU attention kernels (they reject 16).
    hidden_size: int = 128
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    num_hidden_layers: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    # Byte-level BPE: total vocabulary including special and tool-call tokens.
    vocab_size: int = 1024
    # Synthetic documents the tokenizer is trained on (plus, with ``pretrain``, its
    # conversations, so that the vocabulary fits them).
    corpus_documents: int = 4000
    # None: random weights. Otherwise train from scratch on synthetic conversations.
    pretrain: Pretraining | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def digest(self) -> str:
        """A short hash of the fields and BUILDER_VERSION, stable across processes."""
        payload = {"builder_version": BUILDER_VERSION, **dataclasses.asdict(self)}
        if self.pretrain is None:
            del payload["pretrain"]  # so untrained recipes keep the digests they had
        encoded = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(encoded).hexdigest()[:12]


def chat_template() -> str:
    """The ChatML template shipped as ``chat_template.jinja`` next to this module."""
    return resources.files(__package__ or "nextstate.learner").joinpath(
        "chat_template.jinja"
    ).read_text(encoding="utf-8")


# --- the build pipeline --------------------------------------------------------------------


def build_tokenizer(recipe: ToyModelRecipe) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the synthetic corpus and wrap it for transformers."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    # The same normalizer and pre-tokenizer as transformers' Qwen2Tokenizer, which
    # AutoTokenizer (and so vLLM) substitutes for any tokenizer of a qwen2 model.
    tokenizer = Tokenizer(BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=recipe.vocab_size - len(TOOL_CALL_TOKENS),
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = synthetic_corpus(recipe.seed, recipe.corpus_documents)
    if recipe.pretrain is not None:
        corpus += recipe.pretrain.corpus()
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_CALL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=chat_template(),
        model_max_length=recipe.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )


def init_model(recipe: ToyModelRecipe, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A Qwen2ForCausalLM with seeded random weights; the caller's RNG state is untouched."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    vocab = tokenizer.get_vocab()
    endoftext, im_end = vocab[ENDOFTEXT], vocab[IM_END]
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        head_dim=recipe.head_dim,
        max_position_embeddings=recipe.max_position_embeddings,
        rope_theta=recipe.rope_theta,
        tie_word_embeddings=recipe.tie_word_embeddings,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        pad_token_id=endoftext,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=im_end, pad_token_id=endoftext
    )
    return model


def _stages(recipe: ToyModelRecipe) -> list[Stage]:
    """The optional stages the recipe asks for, in order.

    A new stage adds a recipe field, a function with the ``Stage`` signature, and a line
    here appending it when the field asks for it.
    """
    return [pretrain_stage] if recipe.pretrain is not None else []


def pretrain_stage(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast,
                   recipe: ToyModelRecipe, progress: Progress) -> None:
    """Train from scratch on synthetic conversations (the recipe's ``Pretraining``)."""
    assert recipe.pretrain is not None
    recipe.pretrain.train(model, tokenizer, progress)


def _save(
    model_dir: Path, recipe: ToyModelRecipe, tokenizer: PreTrainedTokenizerFast,
    model: PreTrainedModel,
) -> None:
    """Write tokenizer, template, weights, generation config and recipe.json."""
    from transformers.utils import logging

    tokenizer.save_pretrained(model_dir)
    # transformers 5 writes the template only to chat_template.jinja and names its own backend
    # class; embedding the template and naming the portable class lets transformers 4.x (the
    # one a GPU host's vLLM may bring) load the same directory.
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=chat_template())
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    bars_were_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # "Writing model shards" is noise for a 2.5 MB file
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


def build_toy_model(
    out_dir: Path, recipe: ToyModelRecipe = ToyModelRecipe(), progress: Progress | None = None
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
        tokenizer = build_tokenizer(recipe)
        report(f"initialising weights (vocab {len(tokenizer)}, seed {recipe.seed})")
        model = init_model(recipe, tokenizer)
        for stage in _stages(recipe):
            report(f"running stage {getattr(stage, '__name__', stage)}")
            stage(model, tokenizer, recipe, report)
        _save(tmp_dir, recipe, tokenizer, model)
        os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    report(f"built {out_dir} in {time.monotonic() - started:.1f} s")
    return out_dir


def ensure_toy_model(
    data_dir: Path, recipe: ToyModelRecipe = ToyModelRecipe(), progress: Progress | None = None
) -> Path:
    """Return ``data_dir/models/toy-<digest>``, building it first if it is missing.

    A file lock makes concurrent callers wait for one build instead of racing.
    """
    report = progress or (lambda _line: None)
    target = Path(data_dir) / "models" / f"toy-{recipe.digest()}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock", report):
        if target.is_dir():
            report(f"toy model ready at {target} (built by another process)")
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a build that was killed
        duration = "a few seconds" if recipe.pretrain is None else "several minutes"
        report(f"building toy model {target.name} (takes {duration}, done once)")
        return build_toy_model(target, recipe, progress=report)


@contextmanager
def _locked(path: Path, report: Progress) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` for the duration of a ``with`` block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report("another process is building the toy model; waiting")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
