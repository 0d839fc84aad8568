"""A LoRA step on a turn with screenshots, on the VLM toy (learner -> trainer): is it
feasible here, and what do the images cost?

For a GUI turn with ``k`` screenshots (the prompt a 30-step session resends grows to ``k``
images), one forward + backward pass of LoRA on the language part
(`nextstate.learner.multimodal`) with the processor's pixel inputs, against the same
pass on a text-only prompt of the same length (the image placeholders swapped for a
text token, no pixels): the ratio is what the vision tower and connector add. Seconds are
the median of ``--repeats``; memory is the process's peak RSS after each size (sizes run
in increasing order, so each peak belongs to the largest so far).

    python -m bench.vlm_lora_step                 # 1, 4, 10, 30 screenshots, ~1-2 min
    python -m bench.vlm_lora_step --screens 1 --repeats 1 --out /tmp/x.json   # quick

Writes ``bench/results/vlm_lora_step.json``. Wall-clock times on a shared machine are
noisy; the ratio, measured side by side, is the number to read.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from nextstate.learner.multimodal import LANGUAGE_LORA_TARGETS, completion_logprobs, pixel_inputs
from nextstate.learner.vlm_toy_model import ensure_vlm_toy_model

COMPLETION = "click(40, 20)<|im_end|>"


def screens(k: int) -> list[Any]:
    """``k`` different 640x400 screens (a window, a button that moves)."""
    from PIL import Image, ImageDraw

    out = []
    for i in range(k):
        image = Image.new("RGB", (640, 400), (236, 236, 236))
        draw = ImageDraw.Draw(image)
        draw.rectangle([20, 20, 620, 60], fill=(40, 80, 160))
        draw.rectangle([40 + 12 * i, 300, 160 + 12 * i, 340], fill=(30, 150, 60))
        draw.text((50 + 12 * i, 312), f"OK {i}", fill=(255, 255, 255))
        out.append(image)
    return out


def turn(processor: Any, images: list[Any]) -> tuple[list[int], list[int]]:
    """The prompt ids vLLM would record (images expanded) and a short completion."""
    parts: list[dict[str, Any]] = [{"type": "image"} for _ in images]
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "Click OK."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = processor(text=[text], images=[images])["input_ids"][0]
    return [int(t) for t in prompt], processor.tokenizer.encode(COMPLETION)


def step_seconds(model: Any, prompt: list[int], completion: list[int],
                 pixels: dict[str, torch.Tensor], repeats: int) -> float:
    """Median seconds of forward + backward of the completion's mean NLL."""
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        loss = -completion_logprobs(model, prompt, completion, pixels).mean()
        loss.backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screens", type=int, nargs="+", default=[1, 4, 10, 30])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/vlm_lora_step.json"))
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from nextstate.core.paths import data_dir

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir = ensure_vlm_toy_model(args.data_dir or data_dir(), progress=print)
    processor = AutoProcessor.from_pretrained(model_dir)
    image_token = processor.image_token_id
    filler = processor.tokenizer.encode(" the")[0]
    model = get_peft_model(AutoModelForImageTextToText.from_pretrained(model_dir), LoraConfig(
        r=16, lora_alpha=32, target_modules=LANGUAGE_LORA_TARGETS))
    rows = []
    for k in sorted(args.screens):
        images = screens(k)
        prompt, completion = turn(processor, images)
        started = time.perf_counter()
        pixels = pixel_inputs(processor, images)
        preprocess = time.perf_counter() - started
        with_images = step_seconds(model, prompt, completion, pixels, args.repeats)
        text_only = [filler if t == image_token else t for t in prompt]
        without = step_seconds(model, text_only, completion, {}, args.repeats)
        rows.append({
            "screens": k, "prompt_tokens": len(prompt),
            "image_tokens": prompt.count(image_token),
            "tiles": int(pixels["pixel_values"].shape[1]),
            "preprocess_s": round(preprocess, 4), "step_s": round(with_images, 4),
            "text_only_step_s": round(without, 4), "ratio": round(with_images / without, 2),
            "peak_rss_mib": round(peak_rss_mib()),
        })
        print(json.dumps(rows[-1]), flush=True)
    summary = {"model": model_dir.name, "threads": args.threads, "repeats": args.repeats,
               "lora": {"r": 16, "targets": LANGUAGE_LORA_TARGETS}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
