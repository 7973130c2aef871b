"""Write a tiny stand-in Sa2VA checkpoint that behaves like Sa2VA's real code where the adapter relies on it.

The real model cannot be downloaded here (and Sa2VA's code is not ours to ship), so this is a small
model of our own, written after Sa2VA's `modeling_sa2va_chat.py` / `sam2.py` (see the adapter's docs),
that keeps the behaviours that broke or could break the adapter:

- remote code: `config.json` `auto_map` -> `Sa2VAChatConfig` / `Sa2VAChatModel` in `.py` files beside it,
  with an un-executed `import flash_attn` that transformers' import check sees;
- constructors that call `.item()` on tensors (InternViT's drop-path schedule from `torch.linspace`), so
  building the model under `torch.device("meta")` fails as it does for the real one;
- no `self.post_init()` when `call_post_init=False` (Sa2VA's shipped class; transformers 5 then fails);
- `preparing_for_generation(tokenizer, max_new_tokens, torch_dtype=torch.bfloat16)` setting the dtype every
  input is cast to (a float32 model fails on bf16 inputs unless the dtype is passed through);
- `predict_forward` with Sa2VA's image path: InternVL tiling (`dynamic_preprocess`, 448² tiles, thumbnail),
  `<img><IMG_CONTEXT>*n</img>` in a Qwen chat template, a real `Qwen2ForCausalLM` that *generates* the
  answer with `output_hidden_states=True`, the [SEG] hidden state taken where `[SEG]` is the input,
  `text_hidden_fcs`, and a SAM2 stand-in whose state lives on `torch.device("cuda")` (the current CUDA
  device, as Sa2VA's `.cuda()` calls; the CPU when there is no GPU) returning float32
  `[1, 1, 1024, 1024]` logits from `grounding_encoder.language_embd_inference`, resized bilinearly and
  thresholded at `sigmoid > 0.5` into bool `(1, H, W)` masks, one per `[SEG]`;
- a tokenizer (byte-level BPE, Qwen2Tokenizer) with Sa2VA's added tokens, eos `<|im_end|>`.

Random weights answer random tokens; `steer_answer` makes greedy decoding answer like a fine-tuned Sa2VA,
whatever the image: "It is [SEG]." by default, or what `answer=` says ("They are [SEG] and [SEG].": two
masks; "Sorry.": no `[SEG]`, no mask). Switches: `sabotage=True`
returns masks that disagree with the logits (the self-check must catch it); `init_error="..."` makes
loading fail with that AttributeError (version breakage).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

CONFIG_PY = """
from transformers import PretrainedConfig


class Sa2VAChatConfig(PretrainedConfig):
    model_type = "sa2va_standin_chat"

    def __init__(self, hidden=64, n_layers=2, vocab=400, vit_hidden=32, prompt_dim=8, call_post_init=True,
                 sabotage=False, init_error=None, **kwargs):
        self.hidden = hidden
        self.n_layers = n_layers
        self.vocab = vocab
        self.vit_hidden = vit_hidden
        self.prompt_dim = prompt_dim
        self.call_post_init = call_post_init
        self.sabotage = sabotage
        self.init_error = init_error
        super().__init__(**kwargs)
"""

MODELING_PY = '''
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torchvision.transforms.functional import InterpolationMode
from transformers import (GenerationConfig, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM, StoppingCriteria,
                          StoppingCriteriaList)

from .configuration_sa2va_chat import Sa2VAChatConfig

USE_FLASH_ATTN = False
if USE_FLASH_ATTN:  # never runs; transformers' import check still sees it, as in Sa2VA's files
    from flash_attn import flash_attn_func  # noqa: F401

QWEN_CHAT = {"INSTRUCTION": "<|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>assistant\\n",
             "STOP_WORDS": ["<|im_end|>"]}
PATCH_TOKENS = 64  # image tokens per 448x448 tile (Sa2VA: 256)


def cuda_device():
    """Sa2VA's SAM2 and predict_forward call .cuda() / torch.device("cuda"): the *current* CUDA device."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def dynamic_preprocess(image, min_num=1, max_num=6, image_size=448, use_thumbnail=False):
    """InternVL tiling: the grid (cols, rows) closest to the image's aspect ratio, plus a thumbnail."""
    width, height = image.size
    ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if min_num <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    best, best_diff = (1, 1), float("inf")
    for ratio in ratios:
        diff = abs(width / height - ratio[0] / ratio[1])
        if diff < best_diff:
            best, best_diff = ratio, diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    cols, rows = best
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = [resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
             for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


class DirectResize:
    def __init__(self, target_length):
        self.target_length = target_length

    def apply_image(self, image):
        return np.array(Image.fromarray(image).resize((self.target_length, self.target_length)))


class StopWords(StoppingCriteria):
    def __init__(self, tokenizer, word):
        self.tokenizer, self.word = tokenizer, word

    def __call__(self, input_ids, *args, **kwargs):
        return self.tokenizer.decode(input_ids[0]).endswith(self.word)


class VisionStandin(nn.Module):
    """InternViT-like: its __init__ reads a drop-path schedule with .item() (fails on the meta device)."""

    def __init__(self, hidden, layers=2, drop_path_rate=0.1):
        super().__init__()
        self.drop_path = [x.item() for x in torch.linspace(0, drop_path_rate, layers)]
        self.patch = nn.Conv2d(3, hidden, kernel_size=56, stride=56)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in self.drop_path)

    def forward(self, pixel_values):
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return x


class SAM2Standin(nn.Module):
    """Image encoder + mask decoder: 256x256 logits from a prompt embedding, upsampled to 1024x1024."""

    def __init__(self, prompt_dim):
        super().__init__()
        self.hidden_dim = prompt_dim
        self.image_encoder = nn.Conv2d(3, prompt_dim, kernel_size=4, stride=4)
        self.mask_decoder = nn.Conv2d(prompt_dim, prompt_dim, kernel_size=3, padding=1)
        self.img_mean = (0.485, 0.456, 0.406)
        self.img_std = (0.229, 0.224, 0.225)

    def preprocess_image(self, image, dtype=torch.bfloat16):
        image = image / 255.0
        image -= torch.tensor(self.img_mean, dtype=dtype, device=image.device)[:, None, None]
        image /= torch.tensor(self.img_std, dtype=dtype, device=image.device)[:, None, None]
        return image

    def get_sam2_embeddings(self, images):
        return {"images": images, "device": cuda_device()}  # Sa2VA: init_state, on torch.device("cuda")

    def language_embd_inference(self, inference_state, language_embd):
        frames = []
        for frame, embed in zip(inference_state["images"], language_embd):
            image = frame.to(inference_state["device"])[None]  # Sa2VA: .cuda()
            feats = self.mask_decoder(torch.relu(self.image_encoder(image.to(self.image_encoder.weight.dtype))))[0]
            low = torch.einsum("chw,c->hw", feats.float(), embed[0].float())
            low = (low - low.mean()) / (low.std() + 1e-6) * 4.0  # both classes present
            frames.append(low[None, None])
        return F.interpolate(torch.cat(frames), size=(1024, 1024), mode="bilinear", align_corners=False)


class Sa2VAChatModel(PreTrainedModel):
    config_class = Sa2VAChatConfig
    base_model_prefix = "language_model"
    _no_split_modules = ["SAM2Standin", "VisionStandin", "Qwen2DecoderLayer"]

    def __init__(self, config, use_flash_attn=True):
        super().__init__(config)
        if config.init_error:
            raise AttributeError(config.init_error)
        self.template = QWEN_CHAT
        self.vision_model = VisionStandin(config.vit_hidden)
        self.mlp1 = nn.Sequential(nn.LayerNorm(config.vit_hidden), nn.Linear(config.vit_hidden, config.hidden),
                                  nn.GELU(), nn.Linear(config.hidden, config.hidden))
        llm_config = Qwen2Config(hidden_size=config.hidden, intermediate_size=2 * config.hidden,
                                 num_hidden_layers=config.n_layers, num_attention_heads=4, num_key_value_heads=2,
                                 vocab_size=config.vocab, max_position_embeddings=4096, tie_word_embeddings=False)
        llm_config._attn_implementation = "eager"  # Sa2VA without flash-attn
        self.language_model = Qwen2ForCausalLM(llm_config)
        self.grounding_encoder = SAM2Standin(config.prompt_dim)
        self.text_hidden_fcs = nn.Sequential(nn.Linear(config.hidden, config.hidden), nn.ReLU(inplace=True),
                                             nn.Linear(config.hidden, config.prompt_dim), nn.Dropout(0.0))
        self.init_prediction_config = False
        if config.call_post_init:
            self.post_init()

    def extract_feature(self, pixel_values):
        return self.mlp1(self.vision_model(pixel_values))

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, generation_config=None,
                 output_hidden_states=None, return_dict=None, **generate_kwargs):
        device = self.device
        vit_embeds = self.extract_feature(pixel_values.to(device))
        vit_embeds = vit_embeds[torch.sum(pixel_values, dim=(1, 2, 3)) != 0]
        input_embeds = self.language_model.get_input_embeddings()(input_ids.to(device))
        b, n, c = input_embeds.shape
        input_embeds = input_embeds.reshape(b * n, c)
        selected = input_ids.reshape(b * n) == self.img_context_token_id
        input_embeds[selected] = vit_embeds.reshape(-1, c).to(input_embeds.device)
        return self.language_model.generate(
            inputs_embeds=input_embeds.reshape(b, n, c), attention_mask=attention_mask.to(device),
            generation_config=generation_config, output_hidden_states=output_hidden_states, use_cache=True,
            **generate_kwargs)

    def preparing_for_generation(self, tokenizer, max_new_tokens=2048, torch_dtype=torch.bfloat16):
        self.tokenizer = tokenizer
        self.bot_name = "BOT"
        self.stop_criteria = StoppingCriteriaList([StopWords(tokenizer, w) for w in self.template["STOP_WORDS"]])
        self.gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        self.init_prediction_config = True
        self.torch_dtype = torch_dtype
        self.extra_image_processor = DirectResize(target_length=1024)
        self.min_dynamic_patch, self.max_dynamic_patch = 1, 12
        self.image_size, self.use_thumbnail, self.patch_token = 448, True, PATCH_TOKENS
        self.IMG_CONTEXT_TOKEN, self.IMG_START_TOKEN, self.IMG_END_TOKEN = "<IMG_CONTEXT>", "<img>", "</img>"
        self.transformer = T.Compose([
            T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
            T.Resize((self.image_size, self.image_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(), T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
        self.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        self.seg_token_idx = tokenizer.convert_tokens_to_ids("[SEG]")

    def predict_forward(self, image=None, video=None, text=None, past_text="", mask_prompts=None, tokenizer=None,
                        processor=None):
        if not self.init_prediction_config:
            assert tokenizer
            self.preparing_for_generation(tokenizer=tokenizer)
        ori_image_size = image.size
        g_image = self.extra_image_processor.apply_image(np.array(image))
        g_pixel_values = torch.from_numpy(g_image).permute(2, 0, 1).contiguous().to(self.torch_dtype)
        g_pixel_values = torch.stack([self.grounding_encoder.preprocess_image(g_pixel_values)]).to(self.torch_dtype)
        tiles = dynamic_preprocess(image, self.min_dynamic_patch, self.max_dynamic_patch, self.image_size,
                                   self.use_thumbnail)
        pixel_values = torch.stack([self.transformer(tile) for tile in tiles]).to(self.torch_dtype)
        image_tokens = f"{self.IMG_START_TOKEN}{self.IMG_CONTEXT_TOKEN * (len(tiles) * self.patch_token)}"
        image_tokens = (image_tokens + f"{self.IMG_END_TOKEN}\\n").strip()
        input_text = self.template["INSTRUCTION"].format(input=text.replace("<image>", image_tokens), round=1,
                                                         bot_name=self.bot_name)
        ids = torch.tensor(self.tokenizer.encode(input_text)).to(cuda_device()).unsqueeze(0)  # Sa2VA: .cuda()
        output = self.generate(pixel_values=pixel_values, input_ids=ids,
                               attention_mask=torch.ones_like(ids, dtype=torch.bool),
                               generation_config=self.gen_config, bos_token_id=self.tokenizer.bos_token_id,
                               stopping_criteria=self.stop_criteria, output_hidden_states=True,
                               return_dict_in_generate=True)
        predict = self.tokenizer.decode(output.sequences[0], skip_special_tokens=False).strip()
        last_hidden_states = torch.cat([step[-1][0] for step in output.hidden_states], dim=0)
        output_ids = output.sequences[0][:-1]
        if len(output_ids) == 0:
            seg_hidden_states = last_hidden_states[0:0]
        else:
            seg_hidden_states = last_hidden_states[-len(output_ids):][output_ids == self.seg_token_idx]
        ret_masks = []
        for seg_hidden_state in self.text_hidden_fcs(seg_hidden_states):
            sam_states = self.grounding_encoder.get_sam2_embeddings(g_pixel_values)
            pred_masks = self.grounding_encoder.language_embd_inference(sam_states, [seg_hidden_state[None]])
            w, h = ori_image_size
            masks = F.interpolate(pred_masks, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            masks = masks.sigmoid() > 0.5
            if self.config.sabotage:
                masks = ~masks
            ret_masks.append(masks.cpu().numpy())
        return {"prediction": predict, "prediction_masks": ret_masks}
'''

ANSWER = "It is [SEG].<|im_end|>"  # what a vessel fine-tune of Sa2VA answers
PROMPT = "<image>Please segment the blood vessels in this image."
SA2VA_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
                "[SEG]", "<p>", "</p>", "<vp>", "</vp>"]  # fmt: skip
CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tokenizer(out: Path, corpus: list[str]) -> None:
    """A byte-level BPE (Qwen2Tokenizer) learnt on `corpus`, with Sa2VA's added tokens; eos = <|im_end|>."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import Qwen2Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus * 8, vocab_size=320, min_frequency=1, special_tokens=CHAT_TOKENS[:1])
    scratch = out / "_bpe"
    scratch.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(scratch))
    tokenizer = Qwen2Tokenizer(vocab=str(scratch / "vocab.json"), merges=str(scratch / "merges.txt"))
    tokenizer.add_special_tokens(
        {"additional_special_tokens": CHAT_TOKENS[1:] + SA2VA_TOKENS, "eos_token": "<|im_end|>"}
    )
    tokenizer.save_pretrained(out)
    shutil.rmtree(scratch)


def calibration_images(seed: int = 1) -> list[np.ndarray]:
    """Random RGB images of several sizes and aspect ratios (so 1, 2 and 3+1 tiles are seen)."""
    rng = np.random.default_rng(seed)
    sizes = [(48, 64), (70, 90), (40, 120)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def steer_answer(
    model, tokenizer, answer: str, prompt: str = PROMPT, residual_scale: float = 0.05, scale: float = 30.0
) -> None:
    """Make greedy decoding answer `answer` (token ids incl. the end token) whatever the image.

    A trained Sa2VA answers its fine-tuning sentence; random weights answer random tokens. The decoder
    layers' residual writes (`o_proj`, `down_proj`) are scaled by `residual_scale`, so the last-layer
    hidden state at a position is mostly its own token's (the image still moves it a little), and the
    output-head rows of the answer tokens solve W h = scale * onehot(next token) by least squares on the
    teacher-forced hidden states of a few calibration images; every other head row is zero.
    """
    import torch
    from PIL import Image

    from distill.teachers.sa2va_forced import forced_hidden_states, prepare_inputs

    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    with torch.no_grad():
        for name, weight in model.language_model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                weight.mul_(residual_scale)
        hidden = []
        for image in calibration_images():
            states, _ = forced_hidden_states(
                model, [prepare_inputs(model, Image.fromarray(image), prompt)], answer_ids
            )
            hidden.append(states[0].float())
        hidden = torch.cat(hidden).cpu()  # [n_images * k, C] (CUDA's lstsq takes no wide systems)
        tokens = sorted(set(answer_ids))
        targets = torch.zeros(len(hidden), len(tokens))
        for row, token in enumerate(answer_ids * len(calibration_images())):
            targets[row, tokens.index(token)] = scale
        rows = torch.linalg.lstsq(hidden, targets).solution.T  # [len(tokens), C]
        head = model.language_model.get_output_embeddings()
        weight = torch.zeros_like(head.weight, dtype=torch.float32)
        weight[tokens] = rows.to(weight.device)
        head.weight.copy_(weight.to(head.weight.dtype))


def write_standin(
    root: str | Path,
    *,
    call_post_init: bool = True,
    sabotage: bool = False,
    init_error: str | None = None,
    answer: str = ANSWER,
    seed: int = 0,
) -> Path:
    """Write the stand-in checkpoint (float32 on disk, like Sa2VA's) into `root` and return it. CPU, ~2 s.

    `answer` is what its greedy decoding says (e.g. "Sorry.<|im_end|>": no [SEG], no mask)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from distill.teachers.sa2va import flash_attn_optional, post_init_shim

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "configuration_sa2va_chat.py").write_text(CONFIG_PY)
    (root / "modeling_sa2va_chat.py").write_text(MODELING_PY)
    write_tokenizer(root, [PROMPT.replace("<image>", ""), answer, "Please segment every vessel.", "Sorry."])
    tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=True, use_fast=False)
    auto_map = {
        "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
        "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
        "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel",
    }
    config = {
        "model_type": "sa2va_standin_chat",
        "architectures": ["Sa2VAChatModel"],
        "auto_map": auto_map,
        "vocab": len(tokenizer),
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    with flash_attn_optional():
        config = AutoConfig.from_pretrained(root, trust_remote_code=True)
        model_class = get_class_from_dynamic_module(config.auto_map["AutoModel"], str(root))
        with post_init_shim(model_class):
            model = model_class(config).eval()
    model.preparing_for_generation(tokenizer=tokenizer, torch_dtype=torch.float32)
    steer_answer(model, tokenizer, answer)
    # Variant switches are plain config values read by the same code at load time.
    model.config.call_post_init = call_post_init
    model.config.sabotage = sabotage
    model.config.init_error = init_error
    model.save_pretrained(root)
    return root
