"""Sa2VA's mask path without token-by-token generation: one batched, teacher-forced LLM forward.

`predict_forward` (Sa2VA's only inference entry) prepares one image, lets the LLM *generate* its answer
with all hidden states kept, takes the last-layer hidden state at each generated `[SEG]` (the state of
the position where `[SEG]` is the input), projects it with `text_hidden_fcs` and decodes SAM2 with it.
For a fixed prompt a fine-tuned Sa2VA answers the same short sentence every time ("It is [SEG]."), so
the same hidden state comes out of one causal forward pass over prompt + that answer, for a whole
batch of images at once. The functions here rebuild `predict_forward`'s inputs with the model's own
preprocessing (so they follow the checkpoint's code) and run that forward pass; the output head is
applied only at the answer positions, so the caller can check that greedy decoding really gives the
answer (full-vocabulary logits over the whole sequence cost more than generating).

Supported: InternVL-based Sa2VA code (`modeling_sa2va_chat.py`: `extract_feature`, `dynamic_preprocess`,
`<IMG_CONTEXT>` tokens). Images only (no video, no visual prompts).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import DistillError
from distill.views import apply_view

Map = np.ndarray | None  # float32 HxW logits, or None: no [SEG], no mask


@dataclass
class ForcedInputs:
    """One image prepared exactly as `predict_forward` prepares it.

    pixel_values: [tiles, 3, 448, 448] LLM tiles in the model's dtype; g_pixel_values: [1, 3, 1024, 1024]
    normalised SAM2 input; prompt_ids: the token ids of the chat-formatted prompt; size: (H, W) of the image.
    """

    pixel_values: Tensor
    g_pixel_values: Tensor
    prompt_ids: list[int]
    size: tuple[int, int]


def _remote_module(model):
    module = sys.modules[type(model).__module__]
    if not hasattr(module, "dynamic_preprocess") or not hasattr(model, "extract_feature"):
        raise DistillError(
            f"{type(model).__name__} ({module.__name__}): the teacher-forced path supports InternVL-based Sa2VA "
            "code (modeling_sa2va_chat.py with dynamic_preprocess and extract_feature); use path=generate"
        )
    return module


def sam2_input(model, image) -> Tensor:
    """[1, 3, 1024, 1024] SAM2 input of a PIL image: resized ignoring aspect, normalised, model dtype."""
    resized = model.extra_image_processor.apply_image(np.array(image))
    pixels = torch.from_numpy(resized).permute(2, 0, 1).contiguous().to(model.torch_dtype)
    return torch.stack([model.grounding_encoder.preprocess_image(pixels)]).to(model.torch_dtype)


def prepare_inputs(model, image, text: str) -> ForcedInputs:
    """`predict_forward`'s image branch up to the token ids, for one PIL RGB image and a prompt with <image>."""
    module = _remote_module(model)
    tiles = module.dynamic_preprocess(
        image, model.min_dynamic_patch, model.max_dynamic_patch, model.image_size, model.use_thumbnail
    )
    pixel_values = torch.stack([model.transformer(tile) for tile in tiles]).to(model.torch_dtype)
    image_tokens = f"{model.IMG_START_TOKEN}{model.IMG_CONTEXT_TOKEN * (len(tiles) * model.patch_token)}"
    image_tokens = f"{image_tokens}{model.IMG_END_TOKEN}\n".strip()
    prompt = model.template["INSTRUCTION"].format(
        input=text.replace("<image>", image_tokens), round=1, bot_name=model.bot_name
    )
    width, height = image.size
    return ForcedInputs(
        pixel_values, sam2_input(model, image), model.tokenizer.encode(prompt), (height, width)
    )


def _embeddings(model, batch: list[ForcedInputs], ids: Tensor) -> Tensor:
    """Token embeddings with the image tokens replaced by the vision features, as `generate` does."""
    device = model.device
    pixel_values = torch.cat([x.pixel_values for x in batch]).to(device)
    vit_embeds = model.extract_feature(pixel_values)
    vit_embeds = vit_embeds[(pixel_values.sum(dim=(1, 2, 3)) != 0)]  # Sa2VA drops all-zero tiles
    embeds = model.language_model.get_input_embeddings()(ids)
    batch_size, length, channels = embeds.shape
    embeds = embeds.reshape(batch_size * length, channels)
    selected = ids.reshape(-1) == model.img_context_token_id
    embeds[selected] = vit_embeds.reshape(-1, channels).to(embeds.dtype)
    return embeds.reshape(batch_size, length, channels)


@torch.inference_mode()
def forced_hidden_states(model, batch: list[ForcedInputs], answer_ids: list[int]) -> tuple[Tensor, Tensor]:
    """One causal forward over prompt + answer[:-1] for images whose prompts have the same length.

    Returns (hidden [B, k, C], greedy [B, k]): the last-layer hidden state at each position that predicts
    answer token i (position i holds answer token i-1; position 0 is the prompt's last token), and the
    argmax of the output head there. Answer token j's own hidden state (the one Sa2VA takes for a `[SEG]`
    at j) is hidden[:, j + 1]. Raises ValueError when the prompts differ in length.
    """
    lengths = {len(x.prompt_ids) for x in batch}
    if len(lengths) != 1:
        raise ValueError(
            f"forced_hidden_states: prompts of different lengths {sorted(lengths)}; group them first"
        )
    prompt_length = lengths.pop()
    ids = torch.tensor([x.prompt_ids + answer_ids[:-1] for x in batch], device=model.device)
    embeds = _embeddings(model, batch, ids)
    language_model = model.language_model
    outputs = language_model.model(
        inputs_embeds=embeds, attention_mask=torch.ones_like(ids, dtype=torch.bool), use_cache=False
    )
    last = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state
    hidden = last[:, prompt_length - 1 :]  # [B, k, C]
    greedy = language_model.get_output_embeddings()(hidden).argmax(-1)
    return hidden, greedy


@torch.inference_mode()
def decode_seg(model, g_pixel_values: Tensor, seg_hidden: Tensor) -> Tensor:
    """SAM2 logits [n_seg, 1, 1024, 1024] (float32) for one image's `[SEG]` hidden states [n_seg, C].

    Same calls as `predict_forward`: `text_hidden_fcs`, then per `[SEG]` a fresh SAM2 state of the image and
    `grounding_encoder.language_embd_inference`.
    """
    prompts = model.text_hidden_fcs(seg_hidden)
    encoder = model.grounding_encoder
    masks = [
        encoder.language_embd_inference(encoder.get_sam2_embeddings(g_pixel_values), [prompt[None]])
        for prompt in prompts
    ]
    return torch.cat(masks).float()


def logits_at_image_size(pred_masks: Tensor, height: int, width: int) -> Tensor:
    """[T, 1, h, w] SAM2 logits -> [T, H, W], resized exactly as Sa2VA's predict_forward does."""
    return F.interpolate(pred_masks, size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def mask_agreement(forced: Map, generated: Map, shape: tuple[int, int]) -> float:
    """Fraction of pixels where two maps give the same mask (logit > 0); no map = an empty mask."""
    a = np.zeros(shape, bool) if forced is None else forced > 0
    b = np.zeros(shape, bool) if generated is None else generated > 0
    return float(np.mean(a == b))


def seg_hidden_positions(answer_ids: Sequence[int], seg_id: int) -> list[int]:
    """Indices into `forced_hidden_states`' hidden of each `[SEG]` the answer holds (its own state: j + 1).

    A `[SEG]` as the answer's last token has no state there, as in Sa2VA (which drops the last token)."""
    return [j + 1 for j in range(len(answer_ids) - 1) if answer_ids[j] == seg_id]


class TeacherForcing:
    """The teacher-forced path of one loaded model, with its checks and their counts.

    `generate_one(image, prompt)` is the model's own, self-checked path (`predict_forward`), used for the
    default answer, for images whose greedy answer differs (fallback) and for the sample check;
    `last_generated()` gives the token ids it generated last.
    """

    def __init__(
        self,
        model,
        tokenizer,
        generate_one: Callable[[np.ndarray, str], Map],
        last_generated: Callable[[], list[int]],
        answer: str | None,
        check_first: int,
        check_every: int,
        check_agreement: float,
        on_multi_seg: Callable[[], None] = lambda: None,
    ):
        self.model, self.generate_one, self.last_generated = model, generate_one, last_generated
        self.answer_ids = None if answer is None else tokenizer.encode(answer, add_special_tokens=False)
        self.check_first, self.check_every, self.check_agreement = check_first, check_every, check_agreement
        self.on_multi_seg = on_multi_seg
        self.counts = {"forced": 0, "fallback": 0, "sampled": 0}
        self.sample_pixels, self.sample_agreeing, self.worst_sample_agreement = 0, 0, 1.0

    def predict_views(
        self, images: list[np.ndarray], views: Sequence[Sequence[str]], prompts: list[str]
    ) -> list[list[Map]]:
        """[image][view] maps for image i through each of views[i], in the view's frame: one LLM pass per
        image (unviewed), SAM2 per view with the same [SEG] embedding. An image whose greedy answer differs
        runs the full model per view."""
        results = self._answer_from_generation(images, views, prompts)
        todo = [i for i in range(len(images)) if i not in results]
        seg_positions = (
            [] if self.answer_ids is None else seg_hidden_positions(self.answer_ids, self.model.seg_token_idx)
        )
        if not seg_positions:  # no answer with a [SEG] yet: Sa2VA's own path decides
            results.update({i: self._generated_views(images[i], views[i], prompts[i]) for i in todo})
            todo = []
        for group, batch, hidden, ok in self._groups(images, prompts, todo):
            for row, i in enumerate(group):
                if not ok[row]:
                    self.counts["fallback"] += 1
                    results[i] = self._generated_views(images[i], views[i], prompts[i])
                    continue
                self.counts["forced"] += 1
                if len(seg_positions) > 1:
                    self.on_multi_seg()
                seg_hidden = hidden[row, seg_positions]
                results[i] = [self._decode(images[i], view, batch[row], seg_hidden) for view in views[i]]
                if "identity" in views[i]:
                    self._sample_check(images[i], prompts[i], results[i][list(views[i]).index("identity")])
        return [results[i] for i in range(len(images))]

    def stats(self) -> dict:
        return {
            **self.counts,
            "sample_agreement": self.sample_agreeing / self.sample_pixels if self.sample_pixels else None,
            "worst_sample_agreement": self.worst_sample_agreement if self.sample_pixels else None,
        }

    def _generated_views(self, image: np.ndarray, views: Sequence[str], prompt: str) -> list[Map]:
        return [self.generate_one(apply_view(image, view), prompt) for view in views]

    def _answer_from_generation(self, images, views, prompts) -> dict[int, list[Map]]:
        """Until the answer is known, run images through Sa2VA's own path; the first answer with a [SEG]
        (generated on the unviewed image) becomes the expected answer."""
        done: dict[int, list[Map]] = {}
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            if self.answer_ids is not None:
                break
            identity = self.generate_one(image, prompt)
            if identity is not None:
                self.answer_ids = list(self.last_generated())
            done[i] = [
                identity if v == "identity" else self.generate_one(apply_view(image, v), prompt)
                for v in views[i]
            ]
        return done

    def _groups(
        self, images, prompts, todo
    ) -> Iterator[tuple[list[int], list[ForcedInputs], Tensor, list[bool]]]:
        """Per group of equal prompt length: (indices, inputs, hidden [B, k, C], greedy answer ok [B])."""
        from PIL import Image

        if not todo or self.answer_ids is None:
            return
        prepared = {i: prepare_inputs(self.model, Image.fromarray(images[i]), prompts[i]) for i in todo}
        by_length: dict[int, list[int]] = {}
        for i in todo:
            by_length.setdefault(len(prepared[i].prompt_ids), []).append(i)
        answer = torch.tensor(self.answer_ids)
        for group in by_length.values():
            batch = [prepared[i] for i in group]
            hidden, greedy = forced_hidden_states(self.model, batch, self.answer_ids)
            yield group, batch, hidden, (greedy.cpu() == answer).all(dim=1).tolist()

    def _decode(self, image: np.ndarray, view: str, inputs: ForcedInputs, seg_hidden: Tensor) -> np.ndarray:
        from PIL import Image

        if view == "identity":
            g_pixel_values, (height, width) = inputs.g_pixel_values, inputs.size
        else:
            viewed = apply_view(image, view)
            g_pixel_values, (height, width) = (
                sam2_input(self.model, Image.fromarray(viewed)),
                viewed.shape[:2],
            )
        logits = logits_at_image_size(decode_seg(self.model, g_pixel_values, seg_hidden), height, width)
        return logits.amax(0).float().cpu().numpy()  # several [SEG]: the union of their masks

    def _sample_check(self, image: np.ndarray, prompt: str, forced: Map) -> None:
        """On the first `check_first` and every `check_every`-th forced image (0: none), compare with
        predict_forward."""
        n = self.counts["forced"] - 1
        if not (n < self.check_first or (self.check_every and n % self.check_every == 0)):
            return
        agreement = mask_agreement(forced, self.generate_one(image, prompt), image.shape[:2])
        pixels = image.shape[0] * image.shape[1]
        self.counts["sampled"] += 1
        self.sample_pixels += pixels
        self.sample_agreeing += round(agreement * pixels)
        self.worst_sample_agreement = min(self.worst_sample_agreement, agreement)
        if agreement < self.check_agreement:
            raise DistillError(
                f"teacher_forced check failed: on a sampled image its mask agrees with Sa2VA's predict_forward on "
                f"{100 * agreement:.2f}% of pixels (< check_agreement {100 * self.check_agreement:.2f}%). Use "
                "--teacher-option path=generate, or lower check_agreement if the difference is acceptable."
            )
